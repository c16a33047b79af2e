"""Extraction equals a plain forward pass, pools the right positions and resumes after kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vlmlayers import activations, prompts
from vlmlayers.cli import main
from vlmlayers.data import DatasetError
from vlmlayers.models import ModelSpec, load


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
    out = tmp_path_factory.mktemp("act") / "image"
    _extract(tiny_models["tuned"], tiny_world / "analysis.parquet", out)
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


def test_text_modality_has_no_image_pooling(tiny_models, tiny_world, tmp_path):
    _extract(tiny_models["tuned"], tiny_world / "analysis.parquet", tmp_path / "t", "text")
    assert "mean_image" not in activations.read_manifest(tmp_path / "t")["poolings"]
    ids, X = activations.load(tmp_path / "t", 2, "mean_text")
    assert X.shape == (48, 32)


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
    ]
    # The same command, killed with SIGKILL right after its 5th shard file: a real kill -9 at a
    # fixed point (polling for a file raced a tiny model that finishes in milliseconds).
    killer = (
        "import os, signal, sys\n"
        "from vlmlayers import activations\n"
        "from vlmlayers.cli import main\n"
        "write, count = activations.write_shard, [0]\n"
        "def write_then_die(*args, **kwargs):\n"
        "    write(*args, **kwargs)\n"
        "    count[0] += 1\n"
        "    if count[0] == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "activations.write_shard = write_then_die\n"
        "main(sys.argv[1:])\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer, *cmd[3:]], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists(), "a killed run must not leave the final directory"
    assert len(list(partial.rglob("part-*.parquet"))) == 5
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "resuming" in result.stdout
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
