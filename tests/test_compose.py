"""vlmlayers compose: a VLM from the tuned model's architecture, a base LM's weights and a
projector file in LLaVA's original layout (how LLaVA-1.5's stage-1 model is made), on tiny
random models; then the composed checkpoint through extraction, evaluation and the workflow.

The tiny pair is made like the real one: the tuned model's tokenizer is the base LM's plus an
image token at the end, so its vocabulary has one more row (LLaVA-1.5: 32,064 vs Vicuna's 32,000).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from families import build_tiny
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from workflow_helpers import SnakemakeFailed, copy_workflow, run_snakemake

from vlmlayers import compose as compose_mod
from vlmlayers.cli import main
from vlmlayers.compose import MANIFEST, ComposeError, compose
from vlmlayers.config import ConfigError, validate
from vlmlayers.models import ModelSpec, load

LLAVA_KEYS = ("model.mm_projector.0", "model.mm_projector.2")


def _projector_state(hidden: int = 32, seed: int = 7, rows: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{LLAVA_KEYS[0]}.weight": torch.randn(rows, hidden, generator=g),
        f"{LLAVA_KEYS[0]}.bias": torch.randn(rows, generator=g),
        f"{LLAVA_KEYS[1]}.weight": torch.randn(hidden, rows, generator=g),
        f"{LLAVA_KEYS[1]}.bias": torch.randn(hidden, generator=g),
    }


def _image_token_appended(tuned: Path, base: Path) -> None:
    """Give ``tuned`` the base LM's tokenizer + "<image>" as the last id (as LLaVA does)."""
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.save_pretrained(tuned)
    config = json.loads((tuned / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == len(tok)
    config["image_token_index"] = tok.convert_tokens_to_ids("<image>")
    (tuned / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    base = build_tiny("llama", root / "base", seed=1)
    tuned = build_tiny("llava", root / "tuned", seed=0)
    _image_token_appended(tuned, base)
    projector = root / "mm_projector.bin"
    torch.save(_projector_state(), projector)
    return {"base": base, "tuned": tuned, "projector": projector, "root": root}


def _compose_cli(parts, out: Path, *extra: str) -> None:
    main(
        [
            "compose",
            "--architecture",
            str(parts["tuned"]),
            "--language-model",
            str(parts["base"]),
            "--projector",
            str(parts["projector"]),
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def composed(parts) -> Path:
    out = parts["root"] / "composed"
    _compose_cli(parts, out)
    return out


def _load(path: Path, role: str = "aligned"):
    return load(ModelSpec(name="m", path=str(path), role=role, family="llava"))


def test_composed_weights_come_from_their_sources(parts, composed):
    model = _load(composed).model.state_dict()
    base = AutoModelForCausalLM.from_pretrained(parts["base"]).state_dict()
    tuned = _load(parts["tuned"], "tuned").model.state_dict()
    rows = base["model.embed_tokens.weight"].shape[0]
    assert model["model.language_model.embed_tokens.weight"].shape[0] == rows + 1

    lm = {k.removeprefix("model."): v for k, v in base.items() if k.startswith("model.")}
    for key, value in lm.items():
        mine = model[f"model.language_model.{key}"]
        if key == "embed_tokens.weight":  # base rows copied, the image token's row kept
            assert torch.equal(mine[:rows], value)
            assert torch.equal(mine[rows:], tuned[f"model.language_model.{key}"][rows:])
        else:
            assert torch.equal(mine, value), key
    assert torch.equal(model["lm_head.weight"][:rows], base["lm_head.weight"])
    assert torch.equal(model["lm_head.weight"][rows:], tuned["lm_head.weight"][rows:])

    file = torch.load(parts["projector"], weights_only=True)
    for old, new in zip(LLAVA_KEYS, ("linear_1", "linear_2"), strict=True):
        for leaf in ("weight", "bias"):
            mine = model[f"model.multi_modal_projector.{new}.{leaf}"]
            assert torch.equal(mine, file[f"{old}.{leaf}"])
            assert not torch.equal(mine, tuned[f"model.multi_modal_projector.{new}.{leaf}"])

    vision = [k for k in tuned if k.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(model[k], tuned[k]) for k in vision)
    # nothing else: every tensor came from one of the three
    assert set(model) == set(tuned)


def test_manifest_names_the_sources(parts, composed):
    manifest = json.loads((composed / MANIFEST).read_text())
    assert manifest["architecture"]["path"] == str(parts["tuned"])
    assert manifest["language_model"]["path"] == str(parts["base"])
    assert manifest["projector"]["path"] == str(parts["projector"])
    digest = hashlib.sha256(parts["projector"].read_bytes()).hexdigest()
    assert manifest["projector"]["sha256"] == digest
    weights = parts["base"] / "model.safetensors"
    files = manifest["language_model"]["files"]
    assert files["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    listing = "".join(f"{h}  {n}\n" for n, h in sorted(files.items()))
    assert manifest["language_model"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert len(manifest["architecture"]["sha256"]) == 64
    assert manifest["projector_map"] == {
        "mode": "auto",
        "prefixes": {LLAVA_KEYS[0]: "linear_1", LLAVA_KEYS[1]: "linear_2"},
    }
    vocab = manifest["vocab"]
    rows = vocab["language_model_rows"]
    assert vocab["architecture_rows"] == rows + 1
    assert vocab["kept_rows_from_architecture"] == {"start": rows, "stop": rows + 1}
    assert set(vocab["resized"]) == {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    assert manifest["tokenizer_check"]["mismatched_ids"] == 0
    assert manifest["kept_from_architecture"] == []
    # self-contained: weights, config and processor next to the manifest
    names = {p.name for p in composed.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names


def test_composed_model_extracts_and_evaluates(composed, tiny_world, tmp_path):
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(8)
    rows.to_parquet(tmp_path / "pairs.parquet")
    spec = ["--model", "aligned", "--path", str(composed), "--family", "llava"]
    for modality in ("image", "text"):
        main(
            [
                "extract",
                *spec,
                "--role",
                "aligned",
                "--data",
                str(tmp_path / "pairs.parquet"),
                "--modality",
                modality,
                "--out",
                str(tmp_path / modality),
                "--batch-size",
                "4",
                "--shard-size",
                "8",
                "--poolings",
                "last",
                "mean_image",
            ]
        )
        manifest = json.loads((tmp_path / modality / "manifest.json").read_text())
        assert manifest["model_path"] == str(composed)
        assert manifest["n_layers"] == 2
    main(
        [
            "evaluate",
            *spec,
            "--role",
            "aligned",
            "--data",
            str(tiny_world / "test.parquet"),
            "--limit",
            "6",
            "--batch-size",
            "6",
            "--max-new-tokens",
            "2",
            "--harness",
            "plain",
            "--out",
            str(tmp_path / "eval.parquet"),
        ]
    )
    table = pd.read_parquet(tmp_path / "eval.parquet")
    assert set(table["modality"]) == {"image", "text"}
    assert (table["n"] > 0).all()  # only subsets that hold items
    accuracy = table[table["metric"] == "accuracy"]["value"]
    assert not accuracy.empty and accuracy.between(0, 1).all()
    assert (table[table["metric"] == "answer_logprob"]["value"] <= 0).all()


def test_explicit_map_and_safetensors_projector(parts, tmp_path):
    state = _projector_state(seed=3)
    renamed = {
        k.replace(LLAVA_KEYS[0], "proj.in").replace(LLAVA_KEYS[1], "proj.out"): v
        for k, v in state.items()
    }
    file = tmp_path / "projector.safetensors"
    save_file(renamed, file)
    mapping = {"proj.in": "linear_1", "proj.out": "linear_2"}
    _compose_cli(
        {**parts, "projector": file}, tmp_path / "out", "--projector-map", json.dumps(mapping)
    )
    model = _load(tmp_path / "out").model
    assert torch.equal(
        model.model.multi_modal_projector.linear_2.weight, renamed["proj.out.weight"]
    )
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["projector_map"] == {"mode": "explicit", "prefixes": mapping}
    assert manifest["projector"]["format"] == "safetensors"


def test_projector_in_hf_names_under_a_prefix_is_found(parts, tmp_path):
    state = {
        k.replace(LLAVA_KEYS[0], "model.multi_modal_projector.linear_1").replace(
            LLAVA_KEYS[1], "model.multi_modal_projector.linear_2"
        ): v
        for k, v in _projector_state().items()
    }
    file = tmp_path / "p.safetensors"
    save_file(state, file)
    manifest = compose(str(parts["tuned"]), str(parts["base"]), file, tmp_path / "out")
    assert manifest["projector_map"]["prefixes"] == {
        "model.multi_modal_projector.linear_1": "linear_1",
        "model.multi_modal_projector.linear_2": "linear_2",
    }


def _bad_projector(tmp_path, state) -> Path:
    file = tmp_path / "bad_projector.bin"
    torch.save(state, file)
    return file


def test_unknown_projector_key_is_named_with_its_file(parts, tmp_path):
    state = _projector_state() | {"model.mm_projector.4.weight": torch.zeros(32, 32)}
    file = _bad_projector(tmp_path, state)
    with pytest.raises(ComposeError, match=r"model\.mm_projector\.4\.weight") as err:
        compose(str(parts["tuned"]), str(parts["base"]), file, tmp_path / "out")
    assert str(file) in str(err.value)
    mapping = {LLAVA_KEYS[0]: "linear_1", LLAVA_KEYS[1]: "linear_2"}
    with pytest.raises(ComposeError, match=r"model\.mm_projector\.4\.weight") as err:
        compose(
            str(parts["tuned"]), str(parts["base"]), file, tmp_path / "out", projector_map=mapping
        )
    assert str(file) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_projector_shape_mismatch_is_named_with_its_file(parts, tmp_path):
    file = _bad_projector(tmp_path, _projector_state(rows=48))  # hidden 48 instead of 32
    with pytest.raises(ComposeError, match=r"model\.mm_projector\.0\.weight.*\(48, 32\)") as err:
        compose(str(parts["tuned"]), str(parts["base"]), file, tmp_path / "out")
    assert str(file) in str(err.value)


def test_pickle_with_code_is_refused(parts, tmp_path):
    file = _bad_projector(tmp_path, {"model.mm_projector.0.weight": Path("x")})
    with pytest.raises(ComposeError, match="weights_only"):
        compose(str(parts["tuned"]), str(parts["base"]), file, tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"intermediate_size": 48},
            r"key 'layers\.0\.mlp\.gate_proj\.weight' has shape \(48, 32\)",
        ),
        ({"num_hidden_layers": 3}, r"unexpected keys 'layers\.2\."),
        ({"num_hidden_layers": 1}, r"missing keys \['model\.language_model\.layers\.1\."),
    ],
    ids=["shape", "unexpected", "missing"],
)
def test_language_model_that_does_not_fit_is_named(parts, tmp_path, change, expected):
    config = AutoModelForCausalLM.from_pretrained(parts["base"]).config
    for key, value in change.items():
        setattr(config, key, value)
    other = tmp_path / "other_lm"
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(parts["base"]).save_pretrained(other)
    with pytest.raises(ComposeError, match=expected) as err:
        compose(str(parts["tuned"]), str(other), parts["projector"], tmp_path / "out")
    assert f"language model {other}" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_tokenizers_that_disagree_are_refused_unless_allowed(parts, tmp_path):
    # The families' llava tokenizer has <image> among its first ids: every later id shifts.
    shifted = build_tiny("llava", tmp_path / "shifted")
    with pytest.raises(
        ComposeError, match=r"tokenizers of .* disagree on \d+ .*\(id 4: '\\n' vs '<image>'\)"
    ):
        compose(str(shifted), str(parts["base"]), parts["projector"], tmp_path / "out")
    manifest = compose(
        str(shifted),
        str(parts["base"]),
        parts["projector"],
        tmp_path / "out",
        allow_tokenizer_mismatch=True,
    )
    assert manifest["tokenizer_check"]["mismatched_ids"] > 0


def test_interrupted_compose_leaves_no_output(parts, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def killed(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)  # weights written, then the job is killed
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed)
    out = tmp_path / "models" / "aligned"
    with pytest.raises(KeyboardInterrupt):
        compose(str(parts["tuned"]), str(parts["base"]), parts["projector"], out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary left either


def test_compose_part_errors_name_the_file(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        compose(str(parts["tuned"]), str(parts["base"]), tmp_path / "missing.bin", tmp_path / "o")
    with pytest.raises(ComposeError, match="projector-map"):
        compose_mod.parse_projector_map("{not json")


# --- config -------------------------------------------------------------------------------------

COMPOSE_ENTRY = {
    "architecture": "tuned",
    "language_model": "base",
    "projector": "checkpoints/mm_projector.bin",
}


def _config(aligned: dict) -> dict:
    return {
        "results_dir": "results/x",
        "world": None,
        "models": {
            "base": {"path": "lmsys/vicuna-7b-v1.5", "role": "base"},
            "tuned": {"path": "llava-hf/llava-1.5-7b-hf"},
            "aligned": aligned,
        },
    }


def test_config_compose_entry_validates_with_defaults():
    config = validate(_config({"role": "aligned", "compose": dict(COMPOSE_ENTRY)}))
    entry = config["models"]["aligned"]
    assert entry["compose"]["projector_map"] == "auto"
    assert entry["family"] is None and entry["role"] == "aligned"
    mapping = {"model.mm_projector.0": "linear_1"}
    validate(_config({"compose": {**COMPOSE_ENTRY, "projector_map": mapping}}))


@pytest.mark.parametrize(
    ("aligned", "expected"),
    [
        (
            {"path": "x", "compose": COMPOSE_ENTRY},
            r"models\.aligned: give exactly one of \['path', 'compose'\], "
            r"found \['path', 'compose'\]",
        ),
        ({"role": "aligned"}, r"models\.aligned: give exactly one of .* found none"),
        (
            {"compose": {k: v for k, v in COMPOSE_ENTRY.items() if k != "projector"}},
            r"models\.aligned\.compose: 'projector' is a required property",
        ),
        (
            {"compose": {**COMPOSE_ENTRY, "projecter": "x"}},
            r"models\.aligned\.compose\.projecter: unknown key",
        ),
    ],
    ids=["both", "neither", "no-projector", "typo"],
)
def test_config_bad_compose_entry_is_rejected(aligned, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(_config(aligned))


# --- workflow -----------------------------------------------------------------------------------


def test_paper_config_plans_the_compose_job(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    result = run_snakemake(workdir, "-n", "--cores", "1", "--configfile", "config/paper.yaml")
    text = result.stdout
    assert "rule compose:" in text
    assert "vlmlayers compose --architecture llava-hf/llava-1.5-7b-hf " in text
    assert "--language-model lmsys/vicuna-7b-v1.5 " in text
    assert "mm_projector.bin --projector-map auto --out results/paper/models/aligned" in text
    assert "--model aligned --path results/paper/models/aligned" in text
    assert "rule stage1:" not in text


def test_workflow_composes_and_extracts_the_composed_model(parts, tiny_world, tmp_path):
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(8)
    rows.to_parquet(tmp_path / "pairs.parquet")
    projector = tmp_path / "mm_projector.bin"
    shutil.copy(parts["projector"], projector)
    results = tmp_path / "results"
    config = {
        "results_dir": str(results),
        "world": None,
        "threads": 1,
        "models": {
            "tiny-base": {"path": str(parts["base"]), "role": "base", "family": "llama"},
            "tiny-tuned": {"path": str(parts["tuned"]), "family": "llava"},
            "tiny-aligned": {
                "role": "aligned",
                "family": "llava",
                "compose": {
                    "architecture": "tiny-tuned",
                    "language_model": "tiny-base",
                    "projector": str(projector),
                },
            },
        },
        "datasets": {"pairs": {"path": str(tmp_path / "pairs.parquet")}},
        "extract": {
            "batch_size": 4,
            "shard_size": 8,
            "poolings": ["last"],
            "prompt_entropy": False,
        },
    }
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "config" / "compose.yaml").write_text(yaml.safe_dump(config))
    target = results / "activations" / "tiny-aligned" / "pairs" / "image"
    run_snakemake(workdir, str(target), "--cores", "1", "--configfile", "config/compose.yaml")
    manifest = json.loads((results / "models" / "tiny-aligned" / MANIFEST).read_text())
    assert manifest["architecture"]["path"] == str(parts["tuned"])
    extracted = json.loads((target / "manifest.json").read_text())
    assert extracted["model_path"] == str(results / "models" / "tiny-aligned")
    again = ["-n", "--cores", "1", "--configfile", "config/compose.yaml"]
    assert "rule compose:" not in run_snakemake(workdir, str(target), *again).stdout
    torch.save(_projector_state(seed=11), projector)  # another projector: compose again
    assert "rule compose:" in run_snakemake(workdir, str(target), *again).stdout


def test_world_config_refuses_a_composed_model_named_like_a_world_model(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    extra = {"models": {"aligned": {"role": "aligned", "compose": COMPOSE_ENTRY}}}
    (workdir / "config" / "extra.yaml").write_text(yaml.safe_dump(extra))
    configs = ["config/test.yaml", "config/extra.yaml"]
    with pytest.raises(SnakemakeFailed, match="compose under another name"):
        run_snakemake(workdir, "-n", "--cores", "1", "--configfile", *configs)
