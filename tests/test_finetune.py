"""Selective fine-tuning: bands by relative depth, frozen parts untouched, full = stage 2, resume,
scoring of snapshots and the equal-steps / equal-time table."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vlmlayers import claims, finetune
from vlmlayers.cli import main
from vlmlayers.models import ModelSpec, load
from vlmlayers.world import train

TRAIN = ["--steps", "4", "--batch-size", "8", "--warmup", "1", "--checkpoint-every", "2"]


@pytest.mark.parametrize("n_layers", [8, 12, 24, 32])
def test_thirds_partition_the_blocks_at_any_depth(n_layers):
    early, middle, late = (finetune.band_layers(n_layers, b) for b in ("early", "middle", "late"))
    assert early + middle + late == list(range(n_layers))
    assert finetune.band_layers(n_layers, "complement") == early + late
    assert finetune.band_layers(n_layers, "full") == list(range(n_layers))
    # each third holds the blocks whose centre lies in it, so the split is as even as it can be
    assert max(map(len, (early, middle, late))) - min(map(len, (early, middle, late))) <= 2
    centre = sum(middle) / len(middle)
    assert abs(centre - (n_layers - 1) / 2) <= 0.5


def test_band_of_32_layers_and_user_bands():
    assert finetune.band_layers(32, "middle") == list(range(11, 21))
    assert finetune.band_layers(8, "middle") == [3, 4]
    assert finetune.band_layers(12, "0.5:1") == list(range(6, 12))
    assert finetune.band_layers(12, "0:0.25,0.75:1") == [0, 1, 2, 9, 10, 11]
    for bad in ("middling", "0.7:0.2", "0:1.5", "0.46:0.49"):
        with pytest.raises(ValueError, match="band"):
            finetune.band_layers(12, bad)


def _train(world, aligned, out, variant, *extra):
    main(
        [
            "finetune", "train", "--variant", variant, "--aligned", str(aligned),
            "--data", str(world / "train.parquet"), *TRAIN, "--snapshot-every", "2",
            "--out", str(out), *extra,
        ]
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def middle_run(tiny_world, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "middle"
    return _train(tiny_world, tiny_models["aligned"], out, "middle")


def _parameters(path) -> dict[str, torch.Tensor]:
    return dict(load(ModelSpec(name=path.name, path=str(path))).model.named_parameters())


def test_only_the_band_and_projector_change(tiny_models, middle_run):
    before, after = _parameters(tiny_models["aligned"]), _parameters(middle_run)
    layers = finetune.band_layers(4, "middle")
    paths = load(ModelSpec(name="m", path=str(middle_run))).paths
    trained = [f"{paths.layers}.{i}." for i in layers] + [f"{paths.projector}."]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(tuple(trained)) for k in changed), sorted(changed)
    for start in trained:  # every trainable module moved
        assert any(k.startswith(start) for k in changed), start
    meta = json.loads((middle_run / "training.json").read_text())
    n_trainable = sum(before[k].numel() for k in before if k.startswith(tuple(trained)))
    assert meta["trainable_params"] == n_trainable
    assert meta["layers"] == layers and meta["band"] == "middle"
    assert meta["step_seconds"] > 0 and meta["peak_mem_mb"] > 0
    assert (middle_run / finetune.SNAPSHOTS / "step-000002" / "model.safetensors").exists()
    assert not train.partial_dir(middle_run).exists()


def test_full_band_is_stage_two(tiny_world, tiny_models, tmp_path):
    """`full` is LLaVA's stage 2: same seed and data give the `tuned` checkpoint bit for bit."""
    out = _train(tiny_world, tiny_models["aligned"], tmp_path / "full", "full")
    ours = load_file(out / "model.safetensors")
    tuned = load_file(tiny_models["tuned"] / "model.safetensors")
    assert ours.keys() == tuned.keys()
    assert all(torch.equal(ours[k], tuned[k]) for k in ours)


def test_resume_continues_the_same_loss_curve(
    tiny_world, tiny_models, middle_run, monkeypatch, crash_training_at
):
    out = middle_run.parent / "resumed"
    crash_training_at(3)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_world, tiny_models["aligned"], out, "middle")
    assert (train.partial_dir(out) / train.CHECKPOINT_DIR / "state.pt").exists()
    monkeypatch.undo()
    _train(tiny_world, tiny_models["aligned"], out, "middle")
    straight = pd.read_csv(middle_run / "losses.csv")
    resumed = pd.read_csv(out / "losses.csv")
    pd.testing.assert_series_equal(straight["loss"], resumed["loss"])
    # the snapshot taken before the kill survives it (it lives beside the output until the end)
    assert (out / finetune.SNAPSHOTS / "step-000002" / "model.safetensors").exists()
    a, b = load_file(middle_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_score_and_table(tiny_world, tiny_models, middle_run, tmp_path):
    late = _train(tiny_world, tiny_models["aligned"], tmp_path / "late", "late")
    scored = []
    for run in (middle_run, late):
        out = tmp_path / f"{run.name}.parquet"
        main(
            [
                "finetune", "score", "--run", str(run), "--data",
                str(tiny_world / "test.parquet"), "--modalities", "image", "text",
                "--limit", "16", "--n-boot", "20", "--out", str(out),
            ]
        )  # fmt: skip
        scored.append(out)
    rows = pd.read_parquet(scored[0])
    assert sorted(rows["step"].unique()) == [2, 4]
    assert set(rows["modality"]) == {"image", "text"}
    assert rows["accuracy"].between(0, 1).all() and (rows["n"] > 0).all()
    seconds = pd.read_csv(middle_run / "losses.csv").set_index("step")["seconds"]
    assert rows.loc[rows["step"] == 2, "train_seconds"].eq(seconds.loc[2]).all()

    table_path = tmp_path / "finetune.parquet"
    main(["finetune", "table", "--runs", *map(str, scored), "--out", str(table_path)])
    table = pd.read_parquet(table_path)
    assert set(claims.TABLES["finetune"]) <= set(table.columns)
    assert set(table["comparison"]) == {"equal_steps", "equal_time", "curve"}
    curve = table[table["comparison"] == "curve"]
    for _, run in curve.groupby("variant"):  # every snapshot, in both prompt forms, with its time
        assert sorted(run["step"].unique()) == [2, 4]
        assert set(run["modality"]) == {"image", "text"}
        assert run.groupby("step")["train_seconds"].first().is_monotonic_increasing
    assert (table.loc[table["comparison"] == "equal_steps", "step"] == 4).all()
    budget = table[table["comparison"] == "equal_steps"].groupby("variant")["train_seconds"]
    equal_time = table[table["comparison"] == "equal_time"]
    assert (equal_time["train_seconds"] <= budget.mean().min() + 1e-9).all()
    assert set(equal_time["variant"]) <= {"middle", "late"}


@pytest.mark.parametrize("projector", [True, False])
def test_backward_reaches_below_the_band_only_through_a_trained_projector(
    tiny_world, tiny_models, projector
):
    from vlmlayers.world.train import freeze_except, vlm_batches

    loaded = load(ModelSpec(name="aligned", path=str(tiny_models["aligned"])))
    band = finetune.band_layers(loaded.n_layers, "late")
    freeze_except(loaded.model, finetune.trainable_modules(loaded, band, projector=projector))
    needs_grad = {}
    for i, block in enumerate(loaded.layers):
        block.register_forward_hook(
            lambda m, a, out, i=i: needs_grad.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
    data = pd.read_parquet(tiny_world / "train.parquet")
    loaded.model(**vlm_batches(loaded.processor, data, 0, 2, "vqa")(0))
    below = [needs_grad[i] for i in range(min(band))]
    assert all(below) if projector else not any(below)
    assert all(needs_grad[i] for i in band)
