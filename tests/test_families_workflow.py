"""Real-model path: the workflow (world: null) on tiny random checkpoints of each family, and on
data in each bring-your-own layout (vlmlayers prepare).

One Snakemake run over a bring-your-own config: every family's checkpoint is extracted in both
prompt forms, probed, measured and evaluated on the tiny world's rows, and gets one attention
knockout sweep; the tables must have every layer of every model. Families whose processors need
torchvision to load (``NEEDS_VIDEO_SHIM``) are covered in-process by tests/test_models.py and
tests/test_intervene.py: a workflow job cannot apply the test-only shim.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from families import FAMILIES, NEEDS_VIDEO_SHIM, build_tiny
from formats import export_formats
from workflow_helpers import copy_workflow, run_snakemake

from vlmlayers import activations
from vlmlayers.models import ModelSpec, load

WORKFLOW_FAMILIES = [f for f in FAMILIES if f not in NEEDS_VIDEO_SHIM and f != "llama"]


@pytest.fixture(scope="module")
def families_run(tiny_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    checkpoints = {f: build_tiny(f, base / "ckpt" / f) for f in [*WORKFLOW_FAMILIES, "llama"]}
    models = {
        f"tiny-{f}": {"path": str(p), "family": f, "role": "base" if f == "llama" else "tuned"}
        for f, p in checkpoints.items()
    }
    config = {
        "results_dir": str(base / "results"),
        "world": None,
        "threads": 1,
        "models": models,
        "datasets": {"pairs": {"path": str(tiny_world / "analysis.parquet")}},
        "benchmark": {"path": str(tiny_world / "test.parquet")},
        "extract": {"batch_size": 8, "shard_size": 16, "poolings": ["last", "mean_image"]},
        "evaluate": {"batch_size": 8, "max_new_tokens": 2, "limit": 12},
        "intervene": {
            "batch_size": 8,
            "max_new_tokens": 2,
            "limit": 8,
            "n_boot": 20,
            "runs": {
                f"knockout-{f}": {
                    "intervention": "knockout",
                    "model": f"tiny-{f}",
                    "window": 1,
                    "stride": 1,
                }
                for f in WORKFLOW_FAMILIES
            },
        },
        "probe": {"seeds": [0], "n_boot": 20, "poolings": ["last"]},
        "geometry": {"k": 5, "gride_range_max": 8, "n_boot": 20, "poolings": ["last"]},
        "claims": {},
    }
    workdir = copy_workflow(base / "wf")
    (workdir / "config" / "families.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(
        workdir,
        "--cores",
        "2",
        "--configfile",
        "config/families.yaml",
        env={"SNAKEMAKE_OUTPUT_CACHE": None},
        timeout=1800,
    )
    return base / "results", checkpoints


def test_every_family_runs_through_the_workflow(families_run):
    results, checkpoints = families_run
    for family in [*WORKFLOW_FAMILIES, "llama"]:
        name = f"tiny-{family}"
        n_layers = load(ModelSpec(name=name, path=str(checkpoints[family]))).n_layers
        probe = pd.read_parquet(results / "probe" / name / "pairs.parquet")
        assert sorted(probe["layer"].unique()) == list(range(n_layers + 1)), name
        geometry = pd.read_parquet(results / "geometry" / name / "pairs.parquet")
        # geometry skips layer 0 of the last-token pooling by design: there every sample is the
        # template's same last token (vlmlayers geometry --help)
        assert set(range(1, n_layers + 1)) <= set(geometry["layer"]), name
        evaluation = pd.read_parquet(results / "eval" / f"{name}.parquet")
        forms = {"text"} if family == "llama" else {"image", "text"}
        assert set(evaluation["modality"]) == forms, name
        per_form = evaluation[evaluation["subset"] == "all"].groupby(["modality", "metric"])["n"]
        assert (per_form.sum() == 12).all(), name  # 'all' rows are per task; tasks share the 12
        if family == "llama":
            continue
        knockout = pd.read_parquet(results / "intervention" / f"knockout-{family}.parquet")
        windows = knockout.loc[knockout["window_start"] >= 0, "window_start"].unique()
        assert sorted(windows) == list(range(n_layers)), name
        image = probe[probe["modality_test"] == "image"]
        assert len(image), f"{name}: no image-form probes"
    for kind in ("probe", "id", "overlap", "eval", "intervention"):
        assert (results / "figures" / f"{kind}.png").stat().st_size > 5000


ADAPTER_FAMILIES = ["llava", "idefics3"]


@pytest.fixture(scope="module")
def adapters_run(tiny_world, tmp_path_factory):
    """One workflow over the same rows given directly (Parquet) and as each adapter source."""
    base = tmp_path_factory.mktemp("adapters")
    rows = pd.read_parquet(tiny_world / "analysis.parquet")
    rows.to_parquet(base / "pairs.parquet")
    sources = export_formats(rows, base / "sources")
    benchmark = export_formats(pd.read_parquet(tiny_world / "test.parquet"), base / "bench")
    checkpoints = {f: build_tiny(f, base / "ckpt" / f) for f in ADAPTER_FAMILIES}
    results = base / "results; echo unquoted"  # a path that a shell would split and run
    config = {
        "results_dir": str(results),
        "world": None,
        "threads": 1,
        "models": {f"tiny-{f}": {"path": str(p), "family": f} for f, p in checkpoints.items()},
        "datasets": {"pairs": {"path": str(base / "pairs.parquet")}}
        | {name: {"source": source} for name, source in sources.items()},
        "benchmark": {"source": benchmark["coco"]},
        "extract": {"batch_size": 8, "shard_size": 16, "poolings": ["last"]},
        "evaluate": {"batch_size": 8, "max_new_tokens": 2, "limit": 8},
        "probe": {"seeds": [0], "n_boot": 20, "poolings": ["last"]},
        "geometry": {"k": 5, "gride_range_max": 8, "n_boot": 20, "poolings": ["last"]},
        "claims": {},
    }
    workdir = copy_workflow(base / "wf")
    (workdir / "config" / "adapters.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(
        workdir,
        "--cores",
        "2",
        "--configfile",
        "config/adapters.yaml",
        env={"SNAKEMAKE_OUTPUT_CACHE": None},
        timeout=1800,
    )
    return results, checkpoints


def test_every_adapter_format_gives_the_same_activations(adapters_run):
    results, checkpoints = adapters_run
    for family in ADAPTER_FAMILIES:
        name = f"tiny-{family}"
        n_layers = load(ModelSpec(name=name, path=str(checkpoints[family]))).n_layers
        for modality in ("image", "text"):
            # a CSV holds one caption per row, so its text form differs by design
            formats = ["csv", "coco", "hf"] if modality == "image" else ["coco", "hf"]
            for layer in range(n_layers + 1):
                ids, reference = activations.load(
                    results / "activations" / name / "pairs" / modality, layer
                )
                assert len(ids) == len(pd.read_parquet(results.parent / "pairs.parquet")), name
                for fmt in formats:
                    got_ids, got = activations.load(
                        results / "activations" / name / fmt / modality, layer
                    )
                    assert list(got_ids) == list(ids), (name, fmt)
                    np.testing.assert_array_equal(got, reference, err_msg=f"{name} {fmt}")
        for fmt in ("pairs", "csv", "coco", "hf"):
            probe = pd.read_parquet(results / "probe" / name / f"{fmt}.parquet")
            assert sorted(probe["layer"].unique()) == list(range(n_layers + 1)), (name, fmt)
        evaluation = pd.read_parquet(results / "eval" / f"{name}.parquet")
        per_form = evaluation[evaluation["subset"] == "all"].groupby(["modality", "metric"])["n"]
        assert (per_form.sum() == 8).all(), name
    assert len(pd.read_parquet(results / "data" / "benchmark.parquet")) == 32
