"""The shipped tiny-world checkpoints load, match their manifest and are reproducible."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from vlmlayers.config import load as load_config
from vlmlayers.io import hash_tree
from vlmlayers.models import ModelSpec, load
from vlmlayers.runtime import seed_everything
from vlmlayers.world import scenes, train
from vlmlayers.world.tokenizer import build_tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "tinyworld"


def _manifest(kind: str) -> dict:
    return json.loads((SHIPPED / kind / "training.json").read_text())


@pytest.mark.parametrize("kind", ["base", "vision"])
def test_weights_match_manifest(kind):
    manifest = _manifest(kind)
    assert hash_tree(SHIPPED / kind, "*.safetensors") == manifest["weights_sha256"]
    assert manifest["metrics"]["n"] >= 1000  # final metrics on held-out data


def test_config_states_the_shipped_base_budget():
    """config.yaml's base_lm section is what the shipped base LM was pretrained with, so the
    pretrain rule (config/overlays/pretrain.yaml) retrains it."""
    config = load_config(SHIPPED.parents[1] / "config" / "config.yaml")
    manifest = _manifest("base")
    params, world = manifest["params"], config["world"]
    stated = {"checkpoint_every": world["checkpoint_every"], **world["base_lm"]}
    assert {key: params[key] for key in stated} == stated
    assert params["seed"] == config["seed"]
    assert manifest["world"] == {
        key: world[key] if key in world else config["prompt"][key] for key in manifest["world"]
    }


def test_base_loads_with_the_world_tokenizer():
    manifest = _manifest("base")
    loaded = load(ModelSpec(name="base", path=str(SHIPPED / "base"), role="base", family="llama"))
    assert loaded.n_layers == manifest["params"]["layers"]
    assert loaded.tokenizer.get_vocab() == build_tokenizer(scenes.vocabulary_texts()).get_vocab()
    by_type = manifest["metrics"]["text_accuracy_by_question_type"]
    assert set(by_type) == set(scenes.QUESTIONS)  # every question type was scored


def test_vision_tower_loads():
    from transformers import CLIPVisionModel

    manifest = _manifest("vision")
    tower = CLIPVisionModel.from_pretrained(SHIPPED / "vision", use_safetensors=True)
    assert tower.config.image_size == manifest["params"]["image_size"]
    assert tower.config.patch_size == manifest["params"]["patch"]


def test_pretraining_reproduces_the_first_recorded_losses(tmp_path):
    """The same code, world and seed give the recorded first losses of the shipped base LM."""
    manifest = _manifest("base")
    scenes.build(tmp_path / "world", **manifest["world"])
    params = manifest["params"]
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    defaults = vars(parser.parse_args(["base", "--out", str(tmp_path)]))  # flags added since
    args = argparse.Namespace(
        **{**defaults, **params, "world": tmp_path / "world", "out": tmp_path / "base",
           "steps": 3, "instruct_steps": 0, "chat_steps": 0, "relation_steps": 0, "column_steps": 0}
    )  # fmt: skip
    # the schedule depends on the total steps: compare the warm-up steps, where it does not
    assert args.warmup >= 3
    (tmp_path / "world" / "test.parquet").unlink()  # no final evaluation needed here
    seed_everything(params["seed"])  # as `vlmlayers train` does before building the model
    train.train_base(args)
    recorded = pd.read_csv(SHIPPED / "base" / "losses.csv").head(3)
    rerun = pd.read_csv(tmp_path / "base" / "losses.csv")
    assert rerun["loss"].tolist() == pytest.approx(recorded["loss"].tolist(), rel=1e-4)
