"""Model vs model comparison (`vlmlayers compare`): known answers on synthetic stores, the table's
columns, the errors for stores that cannot be compared, and the workflow's pairs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from workflow_helpers import SnakemakeFailed, copy_workflow, run_snakemake

from vlmlayers import activations, compare
from vlmlayers.cli import main
from vlmlayers.io import write_json

N = 120
IDS = [f"s{i:03d}" for i in range(N)]


def _store(root: Path, per_layer: dict[int, np.ndarray], ids=IDS, **manifest) -> Path:
    """A store as `vlmlayers extract` writes it (two shards per layer, last + mean_text)."""
    for layer, x in per_layer.items():
        for part, rows in enumerate((slice(0, 60), slice(60, None))):
            index = np.arange(len(ids))[rows, None]  # mean pooling differs at layer 0 too
            pooled = {"last": x[rows], "mean_text": 2 * x[rows] + 0.01 * index}
            activations.write_shard(root, "residual", layer, part, ids[rows], pooled)
    meta = {"layers": sorted(per_layer), "n_layers": max(per_layer), "n": len(ids)}
    write_json(
        meta | {"dataset_sha256": "d0", "modality": "image"} | manifest, root / "manifest.json"
    )
    return root


def _layers(seed: int, n_layers: int = 3, dim: int = 16) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {0: np.ones((N, dim))}  # layer 0 at the last token: one embedding for every sample
    for layer in range(1, n_layers + 1):
        out[layer] = rng.normal(size=(N, 4)) @ rng.normal(size=(4, dim)) + 0.1 * rng.normal(
            size=(N, dim)
        )
    return out


def _compare(tmp_path, a: Path, b: Path, *extra: str, modality="image") -> pd.DataFrame:
    out = tmp_path / "compare.parquet"
    main(
        ["compare", "--models", "tuned", "aligned", f"--{modality}", str(a), str(b), "--k", "5",
         "--n-boot", "100", "--seed", "4", "--out", str(out), *extra]
    )  # fmt: skip
    return pd.read_parquet(out)


def _value(table: pd.DataFrame, layer: int, metric: str, **where) -> pd.Series:
    hit = table[(table.layer == layer) & (table.metric == metric)]
    for column, value in where.items():
        hit = hit[hit[column] == value]
    assert len(hit) == 1, (layer, metric, where)
    return hit.iloc[0]


def test_a_model_compared_with_itself_is_identical(tmp_path):
    layers = _layers(0)
    table = _compare(tmp_path, _store(tmp_path / "a", layers), _store(tmp_path / "b", layers))
    assert sorted(table.layer.unique()) == [1, 2, 3]  # layer 0 skipped for `last`
    for layer in (1, 2, 3):
        overlap = _value(table, layer, "neighbour_overlap")
        assert overlap.value == overlap.ci_low == overlap.ci_high == 1.0 and overlap.n == N
        assert _value(table, layer, "cka_linear").value == pytest.approx(1.0)
        assert _value(table, layer, "svcca").value == pytest.approx(1.0)


def test_rotated_copy_is_alike_and_an_unrelated_model_is_not(tmp_path):
    layers = _layers(1)
    rng = np.random.default_rng(2)
    frame, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    rotated = {layer: 3.0 * x @ frame + 5.0 for layer, x in layers.items()}  # same geometry
    a = _store(tmp_path / "a", layers)
    alike = _compare(tmp_path, a, _store(tmp_path / "rot", rotated))
    unrelated = _compare(tmp_path, a, _store(tmp_path / "other", _layers(7)))
    for layer in (1, 2, 3):
        assert _value(alike, layer, "neighbour_overlap").value > 0.95
        assert _value(alike, layer, "cka_linear").value == pytest.approx(1.0)
        assert _value(alike, layer, "svcca").value == pytest.approx(1.0, abs=1e-6)
        low = _value(unrelated, layer, "neighbour_overlap")
        assert low.value < 0.2 and low.ci_low <= low.value <= low.ci_high  # chance: k / N ~ 0.04
        assert _value(unrelated, layer, "cka_linear").value < 0.5
        assert _value(unrelated, layer, "svcca").value < 0.5


def test_cli_writes_the_documented_columns(tmp_path):
    a_img, b_img = _layers(3), _layers(4)
    a_txt, b_txt = _layers(5), _layers(5)
    out = tmp_path / "t~a.parquet"
    main(
        ["compare", "--models", "tuned", "aligned",
         "--image", str(_store(tmp_path / "ai", a_img)), str(_store(tmp_path / "bi", b_img)),
         "--text", str(_store(tmp_path / "at", a_txt, modality="text")),
         str(_store(tmp_path / "bt", b_txt, modality="text")),
         "--poolings", "last", "mean_text", "--k", "5", "--n-boot", "50", "--seed", "9",
         "--out", str(out)]
    )  # fmt: skip
    table = pd.read_parquet(out)
    assert list(table.columns) == list(compare.COLUMNS)
    assert set(table.model) == {"tuned~aligned"}
    assert set(table.model_a) == {"tuned"} and set(table.model_b) == {"aligned"}
    assert set(table.modality) == {"image", "text"} and set(table.tap) == {"residual"}
    assert set(table.metric) == {"neighbour_overlap", "cka_linear", "svcca"}
    assert (table.seed == 9).all() and (table.n == N).all()
    # layer 0 is kept for mean pooling (it differs there in a real model), skipped for last
    assert sorted(table[table.pooling == "last"].layer.unique()) == [1, 2, 3]
    assert sorted(table[table.pooling == "mean_text"].layer.unique()) == [0, 1, 2, 3]
    assert np.allclose(table.relative_depth, table.layer / 3)
    scales = table.groupby("metric")["scale"].first()
    assert scales["neighbour_overlap"] == 5 and scales["svcca"] == 0.99
    assert np.isnan(scales["cka_linear"])
    same = table[(table.modality == "text") & (table.metric == "neighbour_overlap")]
    assert (same.dropna(subset=["value"]).query("layer > 0").value == 1.0).all()
    assert table.groupby(["modality", "pooling", "layer", "metric"]).size().eq(1).all()


def test_stores_of_different_depth_are_not_compared(tmp_path):
    a = _store(tmp_path / "deep", _layers(0, n_layers=4))
    b = _store(tmp_path / "shallow", _layers(0, n_layers=3))
    with pytest.raises(ValueError, match=r"deep has 4 layers and .*shallow has 3"):
        _compare(tmp_path, a, b)


def test_stores_of_different_inputs_are_not_compared(tmp_path):
    layers = _layers(0)
    a = _store(tmp_path / "a", layers)
    other_data = _store(tmp_path / "b", layers, dataset_sha256="d1")
    with pytest.raises(ValueError, match=r"differ in dataset_sha256.*identical inputs"):
        _compare(tmp_path, a, other_data)
    shuffled = _store(tmp_path / "c", layers, ids=IDS[::-1])
    with pytest.raises(ValueError, match=r"ids of .*c do not line up"):
        _compare(tmp_path, a, shuffled)
    with pytest.raises(SystemExit):
        main(["compare", "--models", "a", "b", "--out", str(tmp_path / "x.parquet")])


def _dry_run(tmp_path, override: str) -> str:
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "extra.yaml").write_text(override)
    result = run_snakemake(
        workdir, "-n", "-p", "--cores", "1", "--configfile", "config/test.yaml", "extra.yaml",
        "--until", "compare",
    )  # fmt: skip
    return result.stdout + result.stderr


def test_workflow_compares_the_configured_pairs(tmp_path):
    text = _dry_run(tmp_path, "compare: {pairs: [[tuned, aligned], [tuned, base]], k: 7}\n")
    commands = re.findall(r"vlmlayers compare .*", text)
    assert len(commands) == 2
    tuned_aligned = next(c for c in commands if "--models tuned aligned" in c)
    assert "--image results/activations/tuned/tinyworld/image" in tuned_aligned
    assert "--text results/activations/tuned/tinyworld/text" in tuned_aligned
    assert "--k 7" in tuned_aligned and "compare/tuned~aligned/tinyworld.parquet" in tuned_aligned
    tuned_base = next(c for c in commands if "--models tuned base" in c)
    assert "--image" not in tuned_base  # the base LM has no image prompts
    with pytest.raises(SnakemakeFailed, match=r"compare.pairs: unknown model 'nope'"):
        _dry_run(tmp_path / "bad", "compare: {pairs: [[tuned, nope]]}\n")
