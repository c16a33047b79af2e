"""Extraction equals a plain forward pass (and plain hooks on the MLP and attention output
projection, for the tiny world and three families), pools the right positions, writes per-prompt
entropies, keeps memory per shard and resumes after kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from families import build_tiny

from vlmlayers import activations, extract, prompts
from vlmlayers.cli import main
from vlmlayers.data import DatasetError
from vlmlayers.geometry import matrix_entropy
from vlmlayers.models import ModelSpec, load

ALL_TAPS = ["--taps", "residual", "mlp_out", "heads"]


def _extract(model_dir, data, out, modality="image", *extra):
    main(
        [
            "extract",
            "--model",
            "m",
            "--path",
            str(model_dir),
            "--data",
            str(data),
            "--modality",
            modality,
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--shard-size",
            "16",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def extracted(tiny_models, tiny_world, tmp_path_factory):
    """Every tap, prompt entropy on (the default): 48 samples, shards of 16, batches of 8."""
    out = tmp_path_factory.mktemp("act") / "image"
    _extract(tiny_models["tuned"], tiny_world / "analysis.parquet", out, "image", *ALL_TAPS)
    return out


def test_vectors_equal_plain_forward_pass(extracted, tiny_models, tiny_world):
    loaded = load(ModelSpec(name="m", path=str(tiny_models["tuned"])))
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(8)
    batch = prompts.encode_rows(loaded, rows, "image", 2)
    with torch.no_grad():
        hidden = loaded.model(**batch, output_hidden_states=True).hidden_states
    is_image = (batch["input_ids"] == loaded.image_token_id).unsqueeze(-1).float()
    n_layers = loaded.n_layers
    assert activations.layers(extracted) == list(range(n_layers + 1))
    for layer in range(n_layers + 1):
        ids, last = activations.load(extracted, layer, "last")
        _, mean_image = activations.load(extracted, layer, "mean_image")
        assert list(ids[:8]) == rows["id"].tolist()
        if layer < n_layers:
            expected = hidden[layer]
        else:  # stored before the final norm; HF's last entry has it applied
            normed = loaded.module(loaded.paths.final_norm)(torch.from_numpy(last[:8]))
            assert torch.allclose(normed, hidden[layer][:, -1], atol=1e-5)
            continue
        assert np.array_equal(last[:8], expected[:, -1].numpy())
        manual = (expected * is_image).sum(1) / is_image.sum(1)
        np.testing.assert_allclose(mean_image[:8], manual.numpy(), rtol=1e-5, atol=1e-6)
    assert int(is_image[0].sum()) == 16


def test_manifest_describes_the_store(extracted, tiny_world):
    manifest = activations.read_manifest(extracted)
    assert manifest["n"] == 48 and manifest["modality"] == "image"
    assert manifest["weights_sha256"] and manifest["dataset_sha256"]
    assert "BEFORE the final norm" in manifest["layer_convention"]
    assert set(manifest["poolings"]) == {"last", "mean_image", "mean_text"}
    # tiny LM: 4 blocks, hidden 32, 2 heads of 16
    heads = ["head.00", "head.01"]
    assert manifest["tap_points"] == ["residual", "mlp_out", "heads"]
    assert manifest["taps"] == ["residual", "mlp_out", *heads]
    assert (manifest["n_heads"], manifest["head_dim"], manifest["heads_bias"]) == (2, 16, None)
    assert manifest["layers"]["residual"] == [0, 1, 2, 3, 4]
    for tap in ["mlp_out", *heads]:
        assert manifest["layers"][tap] == [1, 2, 3, 4]
        assert activations.layers(extracted, tap) == [1, 2, 3, 4]
    assert manifest["prompt_entropy"] == "prompt_entropy.parquet"
    assert manifest["module_paths"]["attention_out"] == "self_attn.o_proj"
    found = sorted(p.name for p in extracted.iterdir())
    assert found == [
        "manifest.json",
        "prompt_entropy.parquet",
        "tap=head.00",
        "tap=head.01",
        "tap=mlp_out",
        "tap=residual",
    ]


def test_text_modality_has_no_image_pooling(tiny_models, tiny_world, tmp_path):
    _extract(tiny_models["tuned"], tiny_world / "analysis.parquet", tmp_path / "t", "text")
    manifest = activations.read_manifest(tmp_path / "t")
    assert "mean_image" not in manifest["poolings"]
    ids, X = activations.load(tmp_path / "t", 2, "mean_text")
    assert X.shape == (48, 32)
    # default taps: the residual stream only
    assert manifest["taps"] == ["residual"] and manifest["n_heads"] is None
    assert sorted(p.name for p in (tmp_path / "t").glob("tap=*")) == ["tap=residual"]


def test_kill_minus_nine_then_rerun_is_byte_identical(extracted, tiny_models, tiny_world, tmp_path):
    out = tmp_path / "image"
    partial = out.with_name("image.partial")
    cmd = [
        sys.executable,
        "-m",
        "vlmlayers.cli",
        "extract",
        "--model",
        "m",
        "--path",
        str(tiny_models["tuned"]),
        "--data",
        str(tiny_world / "analysis.parquet"),
        "--modality",
        "image",
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--shard-size",
        "16",
        *ALL_TAPS,
    ]
    # The same command, killed with SIGKILL right after its 22nd tap file: shard 0 (17 files:
    # residual 0-4, mlp_out 1-4, 2 heads x 1-4, then its entropy part) is complete, shard 1 has 5
    # of its files. A real kill -9 at a fixed point (polling for a file raced a tiny model that
    # finishes in milliseconds).
    killer = (
        "import os, signal, sys\n"
        "from vlmlayers import activations\n"
        "from vlmlayers.cli import main\n"
        "write, count = activations.write_shard, [0]\n"
        "def write_then_die(*args, **kwargs):\n"
        "    write(*args, **kwargs)\n"
        "    count[0] += 1\n"
        "    if count[0] == 22:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "activations.write_shard = write_then_die\n"
        "main(sys.argv[1:])\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer, *cmd[3:]], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists(), "a killed run must not leave the final directory"
    assert len(list(partial.glob("tap=*/layer=*/part-*.parquet"))) == 22
    assert [p.name for p in (partial / "prompt_entropy").iterdir()] == ["part-0000.parquet"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "resuming" in result.stdout and "1/3 shards" in result.stdout
    assert not partial.exists()
    files = sorted(p.relative_to(extracted) for p in extracted.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (extracted / rel).read_bytes(), rel


def _with_bad_image(tiny_world, tmp_path) -> Path:
    data = pd.read_parquet(tiny_world / "analysis.parquet").head(10)
    data.loc[3, "image"] = b"not a png"
    path = tmp_path / "bad.parquet"
    data.to_parquet(path)
    return path


def test_bad_image_names_the_row(tiny_models, tiny_world, tmp_path):
    path = _with_bad_image(tiny_world, tmp_path)
    with pytest.raises(DatasetError, match=r"bad\.parquet: row 3 \(id 'analysis-000003'\)"):
        _extract(tiny_models["tuned"], path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_rows_skipped_and_reported_when_configured(tiny_models, tiny_world, tmp_path):
    path = _with_bad_image(tiny_world, tmp_path)
    _extract(tiny_models["tuned"], path, tmp_path / "out", "image", "--on-bad-rows", "skip")
    manifest = activations.read_manifest(tmp_path / "out")
    assert manifest["n"] == 9
    assert [r["id"] for r in manifest["skipped_rows"]] == ["analysis-000003"]
    ids, _ = activations.load(tmp_path / "out", 1, "last")
    assert "analysis-000003" not in set(ids)


def test_nan_activations_are_refused(tmp_path):
    activations.write_shard(
        tmp_path, "residual", 1, 0, ["a", "b"], {"last": np.array([[0.0, 1.0], [np.nan, 2.0]])}
    )
    with pytest.raises(ValueError, match="layer 1.*first id 'b'"):
        activations.load(tmp_path, 1, "last")


# --- tap points against plain hooks -------------------------------------------------------------


def _plain_hooks(loaded, batch) -> dict[str, dict[int, torch.Tensor]]:
    """One forward pass with plain hooks on every block, its MLP and its attention output
    projection (input and output), l = 1..L."""
    seen: dict[str, dict[int, torch.Tensor]] = {"block": {}, "mlp": {}, "o_in": {}, "o_out": {}}

    def output_of(key, index):
        def hook(module, args, output):
            seen[key][index] = output[0] if isinstance(output, tuple) else output

        return hook

    def input_of(key, index):
        def hook(module, args):
            seen[key][index] = args[0]

        return hook

    handles = []
    for index, block in enumerate(loaded.layers, start=1):
        out_proj = block.get_submodule(loaded.paths.attention_out)
        handles += [
            block.register_forward_hook(output_of("block", index)),
            block.get_submodule(loaded.paths.mlp).register_forward_hook(output_of("mlp", index)),
            out_proj.register_forward_pre_hook(input_of("o_in", index)),
            out_proj.register_forward_hook(output_of("o_out", index)),
        ]
    try:
        with torch.no_grad():
            loaded.model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _pooled(hidden: torch.Tensor, batch, image_token_id) -> dict[str, np.ndarray]:
    image = (batch["input_ids"] == image_token_id) & batch["attention_mask"].bool()
    mask = image.unsqueeze(-1).float()
    return {
        "last": hidden[:, -1].numpy(),
        "mean_image": ((hidden * mask).sum(1) / mask.sum(1)).numpy(),
    }


def _assert_taps_equal_plain_hooks(store, loaded, rows) -> None:
    """``rows`` = the first batch of the extraction (same padding): every tap x layer x pooling
    equals what plain hooks give, and the heads add up to the projection's output."""
    manifest = activations.read_manifest(store)
    n_heads, head_dim = manifest["n_heads"], manifest["head_dim"]
    n = len(rows)
    batch = prompts.encode_rows(loaded, rows, "image", 2)
    seen = _plain_hooks(loaded, batch)

    def stored(tap, layer, pooling):
        ids, X = activations.load(store, layer, pooling, tap)
        assert list(ids[:n]) == rows["id"].tolist()
        return X[:n]

    close = dict(rtol=1e-4, atol=1e-5)
    for layer in range(1, loaded.n_layers + 1):
        expected = {
            "residual": _pooled(seen["block"][layer], batch, loaded.image_token_id),
            "mlp_out": _pooled(seen["mlp"][layer], batch, loaded.image_token_id),
        }
        x = seen["o_in"][layer]
        weight = loaded.layers[layer - 1].get_submodule(loaded.paths.attention_out).weight
        heads = []
        for h in range(n_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            heads.append((x[..., cols] @ weight[:, cols].T).detach())
            expected[f"head.{h:02d}"] = _pooled(heads[-1], batch, loaded.image_token_id)
        torch.testing.assert_close(sum(heads), seen["o_out"][layer], **close)
        for tap, by_pooling in expected.items():
            for pooling, want in by_pooling.items():
                np.testing.assert_allclose(
                    stored(tap, layer, pooling), want, **close, err_msg=f"{tap} {layer} {pooling}"
                )
        head_sum = sum(stored(f"head.{h:02d}", layer, "last") for h in range(n_heads))
        o_last = seen["o_out"][layer][:, -1].numpy()
        np.testing.assert_allclose(head_sum, o_last, **close)


def test_taps_equal_plain_hooks_on_the_tiny_world(extracted, tiny_models, tiny_world):
    loaded = load(ModelSpec(name="m", path=str(tiny_models["tuned"])))
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(8)
    _assert_taps_equal_plain_hooks(extracted, loaded, rows)


def _gemma3_wide_heads(out_dir: Path) -> Path:
    """The tiny gemma3 with head_dim 16 (4 heads x 16 = 64 != hidden 32), as real gemma3."""
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    build_tiny("gemma3", out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    config.text_config.head_dim = config.text_config.query_pre_attn_scalar = 16
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.mark.parametrize("family", ["llava", "idefics3", "gemma3"])
def test_taps_equal_plain_hooks_across_families(family, tiny_world, tmp_path):
    if family == "gemma3":
        checkpoint = _gemma3_wide_heads(tmp_path / family)
    else:
        checkpoint = build_tiny(family, tmp_path / family)
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(10)
    rows.to_parquet(tmp_path / "data.parquet")
    out = tmp_path / "store"
    main(
        [
            "extract", "--model", family, "--path", str(checkpoint), "--family", family,
            "--data", str(tmp_path / "data.parquet"), "--modality", "image", "--out", str(out),
            "--batch-size", "4", "--shard-size", "8", *ALL_TAPS,
        ]
    )  # fmt: skip
    loaded = load(ModelSpec(name=family, path=str(checkpoint)))
    manifest = activations.read_manifest(out)
    text = loaded.model.config.get_text_config()
    assert manifest["n_heads"] == text.num_attention_heads == 4
    assert manifest["head_dim"] == (16 if family == "gemma3" else 8)
    assert manifest["taps"][-1] == "head.03"
    _assert_taps_equal_plain_hooks(out, loaded, rows.head(4))
    entropy = pd.read_parquet(out / "prompt_entropy.parquet")
    assert len(entropy) == 10 * (loaded.n_layers + 1)


# --- prompt entropy -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::vlmlayers.geometry.DuplicatePointsWarning")
def test_prompt_entropy_is_matrix_entropy_of_the_tokens(extracted, tiny_models, tiny_world):
    table = pd.read_parquet(extracted / "prompt_entropy.parquet")
    assert list(table.columns) == ["id", "tap", "layer", "entropy"]
    assert table.dtypes["entropy"] == np.float64 and table.dtypes["layer"] == np.int64
    assert len(table) == 48 * 5 and not table.duplicated(["id", "layer"]).any()
    assert set(table["tap"]) == {"residual"} and set(table["layer"]) == {0, 1, 2, 3, 4}
    assert np.isfinite(table["entropy"]).all() and (table["entropy"] > 0).all()

    # Recompute the most padded prompt of the first batch (left padded as in extraction) from a
    # plain forward pass: its non-padding positions only.
    loaded = load(ModelSpec(name="m", path=str(tiny_models["tuned"])))
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(8)
    batch = prompts.encode_rows(loaded, rows, "image", 2)
    with torch.no_grad():
        hidden = list(loaded.model(**batch, output_hidden_states=True).hidden_states[:-1])
    hidden.append(_plain_hooks(loaded, batch)["block"][loaded.n_layers])  # before the final norm
    i = int(batch["attention_mask"].sum(1).argmin())
    real = batch["attention_mask"][i].bool()
    assert (~real).any(), "the test needs a padded prompt"
    tokens = torch.stack([h[i, real] for h in hidden]).numpy()
    expected = [matrix_entropy(layer, device="cpu") for layer in tokens]
    got = table[table["id"] == rows["id"].iloc[i]].sort_values("layer")["entropy"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_interrupted_before_combining_resumes_without_recomputing(
    extracted, tiny_models, tiny_world, tmp_path, monkeypatch
):
    """Killed after every shard but before prompt_entropy.parquet: the rerun computes nothing
    and gives the same files as an uninterrupted run."""

    def die(partial, n_shards):
        raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "image"
    real_combine = extract._combine_entropy
    monkeypatch.setattr(extract, "_combine_entropy", die)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_models["tuned"], tiny_world / "analysis.parquet", out, "image", *ALL_TAPS)
    partial = tmp_path / "image.partial"
    assert not out.exists() and len(list((partial / "prompt_entropy").iterdir())) == 3
    monkeypatch.setattr(extract, "_combine_entropy", real_combine)
    monkeypatch.setattr(extract.prompts, "encode_rows", None)  # any forward pass would fail
    _extract(tiny_models["tuned"], tiny_world / "analysis.parquet", out, "image", *ALL_TAPS)
    files = sorted(p.relative_to(extracted) for p in extracted.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (extracted / rel).read_bytes(), rel


def test_bfloat16_model_extracts_every_tap_and_entropy(tiny_models, tiny_world, tmp_path):
    """The GPU default dtype: bfloat16 activations pool, project and reach matrix_entropy."""
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(8)
    rows.to_parquet(tmp_path / "data.parquet")
    out = tmp_path / "bf16"
    _extract(tiny_models["tuned"], tmp_path / "data.parquet", out, "image", *ALL_TAPS,
             "--dtype", "bfloat16")  # fmt: skip
    manifest = activations.read_manifest(out)
    assert manifest["model_dtype"] == "torch.bfloat16"
    for tap in manifest["taps"]:
        assert activations.load(out, 1, "mean_image", tap)[1].shape == (8, 32)  # finite, checked
    entropy = pd.read_parquet(out / "prompt_entropy.parquet")
    assert len(entropy) == 8 * 5 and np.isfinite(entropy["entropy"]).all()


# --- memory -------------------------------------------------------------------------------------


def test_rows_held_per_write_are_bounded_by_the_shard_size(
    tiny_models, tiny_world, tmp_path, monkeypatch
):
    """Heads only, no entropy, 48 samples in shards of 20: every write gets at most 20 samples
    (one part per shard: 20, 20, 8), whatever the number of taps."""
    sizes: list[tuple[str, int, int]] = []
    write = activations.write_shard

    def spy(root, tap, layer, part, ids, pooled, dtype="float32"):
        assert all(len(v) == len(ids) for v in pooled.values())
        sizes.append((tap, layer, len(ids)))
        return write(root, tap, layer, part, ids, pooled, dtype)

    monkeypatch.setattr(activations, "write_shard", spy)
    out = tmp_path / "text"
    _extract(
        tiny_models["tuned"], tiny_world / "analysis.parquet", out, "text",
        "--taps", "heads", "--no-prompt-entropy", "--shard-size", "20",
    )  # fmt: skip
    assert max(n for _, _, n in sizes) == 20 and sum(n for *_, n in sizes) == 48 * 2 * 4
    assert not (out / "prompt_entropy.parquet").exists() and not (out / "tap=residual").exists()
    manifest = activations.read_manifest(out)
    assert manifest["taps"] == ["head.00", "head.01"] and manifest["prompt_entropy"] is None
    for tap in manifest["taps"]:
        for layer in manifest["layers"][tap]:
            parts = sorted(activations.shard_path(out, tap, layer, 0).parent.glob("part-*"))
            rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
            assert rows == [20 * 2, 20 * 2, 8 * 2]  # 2 poolings (text: last, mean_text)


def test_help_documents_taps_and_prompt_entropy(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = capsys.readouterr().out
    assert "--taps" in text and "mlp_out" in text and "head.00" in text
    assert "--prompt-entropy" in text and "--no-prompt-entropy" in text
