"""Shared fixtures: a tiny world and tiny trained checkpoints, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from vlmlayers.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = ["--layers", "4", "--hidden", "32", "--heads", "2"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    main(
        [
            "world",
            "--out",
            str(out),
            "--n-train",
            "128",
            "--n-test",
            "32",
            "--n-analysis",
            "48",
            "--n-corpus",
            "300",
            "--seed",
            "0",
        ]
    )
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """base (Llama) -> vision (CLIP) -> aligned (stage 1) -> tuned (stage 2), a few steps each."""
    root = tmp_path_factory.mktemp("models")
    paths = {name: root / name for name in ("base", "vision", "aligned", "tuned")}
    common = ["--steps", "4", "--batch-size", "8", "--warmup", "1", "--checkpoint-every", "2"]
    main(
        [
            "train",
            "base",
            "--world",
            str(tiny_world),
            "--out",
            str(paths["base"]),
            *common,
            *TINY_LM,
        ]
    )
    main(
        [
            "train",
            "vision",
            "--out",
            str(paths["vision"]),
            *common,
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--n-images",
            "64",
        ]
    )
    main(
        [
            "train",
            "stage1",
            "--world",
            str(tiny_world),
            "--base",
            str(paths["base"]),
            "--vision",
            str(paths["vision"]),
            "--out",
            str(paths["aligned"]),
            *common,
        ]
    )
    main(
        [
            "train",
            "stage2",
            "--world",
            str(tiny_world),
            "--aligned",
            str(paths["aligned"]),
            "--out",
            str(paths["tuned"]),
            *common,
        ]
    )
    return paths


@pytest.fixture
def crash_training_at(monkeypatch):
    """``crash_training_at(step)``: training raises KeyboardInterrupt (a simulated kill) when it
    asks for that step's batch; ``monkeypatch.undo()`` brings the real loop back."""
    from vlmlayers.world import train

    real_fit = train.fit

    def patch(step: int) -> None:
        def crashing(model, make_batch, out, **kw):
            def exploding(s):
                if s == step:
                    raise KeyboardInterrupt("simulated kill")
                return make_batch(s)

            return real_fit(model, exploding, out, **kw)

        monkeypatch.setattr(train, "fit", crashing)

    return patch


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory) -> tuple[Path, Path]:
    """The whole workflow on config/test.yaml, run locally once: (workdir, results dir)."""
    from workflow_helpers import copy_workflow, run_test_config

    base = tmp_path_factory.mktemp("workflow")
    workdir = copy_workflow(base / "wf")
    results = base / "results"
    run_test_config(workdir, results)
    return workdir, results
