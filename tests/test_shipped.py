"""The shipped tiny-world checkpoints load, match their manifest and are reproducible."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from vlmlayers.io import hash_tree
from vlmlayers.models import ModelSpec, load
from vlmlayers.runtime import seed_everything
from vlmlayers.world import scenes, train

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "tinyworld"


@pytest.mark.parametrize("kind", ["base", "vision"])
def test_weights_match_manifest(kind):
    manifest = json.loads((SHIPPED / kind / "training.json").read_text())
    assert hash_tree(SHIPPED / kind, "*.safetensors") == manifest["weights_sha256"]


def test_base_loads_with_the_world_tokenizer():
    loaded = load(ModelSpec(name="base", path=str(SHIPPED / "base"), role="base", family="llama"))
    assert loaded.n_layers == 12
    vocab = set(loaded.tokenizer.get_vocab())
    assert vocab >= set(scenes.vocabulary_texts()[0].split())
    from vlmlayers.world.tokenizer import build_tokenizer

    assert loaded.tokenizer.get_vocab() == build_tokenizer(scenes.vocabulary_texts()).get_vocab()


def test_pretraining_reproduces_the_first_recorded_losses(tmp_path):
    manifest = json.loads((SHIPPED / "base" / "training.json").read_text())["params"]
    scenes.build(
        tmp_path / "world",
        seed=0,
        image_size=32,
        n_train=4000,
        n_test=700,
        n_analysis=1000,
        n_corpus=20000,
        n_heldout_pairs=4,
        n_captions=2,
    )
    args = argparse.Namespace(
        **{**manifest, "world": tmp_path / "world", "out": tmp_path / "base", "steps": 3}
    )
    # the schedule depends on the total steps: compare the warm-up steps, where it does not
    args.warmup = manifest["warmup"]
    seed_everything(manifest["seed"])  # as `vlmlayers train` does before building the model
    train.train_base(args)
    recorded = pd.read_csv(SHIPPED / "base" / "losses.csv").head(3)
    rerun = pd.read_csv(tmp_path / "base" / "losses.csv")
    assert rerun["loss"].tolist() == pytest.approx(recorded["loss"].tolist(), rel=1e-4)
