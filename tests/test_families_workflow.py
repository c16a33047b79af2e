"""Real-model path: the workflow (world: null) on tiny random checkpoints of each family, with
the data in each bring-your-own layout (vlmlayers prepare).

One Snakemake run over a bring-your-own config: every family's checkpoint is extracted in both
prompt forms from the tiny world's rows given as a contract Parquet, probed and measured,
evaluated on a benchmark given as COCO, and gets one attention knockout sweep; the tables must
have every layer of every model. A second run in the same results directory adds the same rows
given as a CSV, a COCO captions file and a Hugging Face dataset, extracted by one family
(``LAYOUT_FAMILY``: reading a layout does not depend on the model), and the same rows must give
the same activations whatever layout they came in. The results
directory's name holds a "; " so that an unquoted path in a shell command would break the run.
Families whose processors need torchvision to load (``NEEDS_VIDEO_SHIM``) are covered
in-process by tests/test_models.py and tests/test_intervene.py: a workflow job cannot apply the
test-only shim.
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
MODELS = [*WORKFLOW_FAMILIES, "llama"]
LAYOUTS = ("csv", "coco", "hf")  # beside "pairs", the same rows as a contract Parquet
LAYOUT_FAMILY = "llava"
EVAL_LIMIT = 12


@pytest.fixture(scope="module")
def families_run(tiny_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    rows = pd.read_parquet(tiny_world / "analysis.parquet")
    rows.to_parquet(base / "pairs.parquet")
    sources = export_formats(rows, base / "sources")
    benchmark = export_formats(pd.read_parquet(tiny_world / "test.parquet"), base / "bench")
    checkpoints = {f: build_tiny(f, base / "ckpt" / f) for f in MODELS}
    results = base / "results; echo unquoted"
    config = {
        "results_dir": str(results),
        "world": None,
        "threads": 1,
        "models": {
            f"tiny-{f}": {"path": str(p), "family": f, "role": "base" if f == "llama" else "tuned"}
            for f, p in checkpoints.items()
        },
        "datasets": {"pairs": {"path": str(base / "pairs.parquet")}},
        "benchmark": {"source": benchmark["coco"]},
        "extract": {"batch_size": 8, "shard_size": 16, "poolings": ["last", "mean_image"]},
        "evaluate": {"batch_size": 8, "max_new_tokens": 2, "limit": EVAL_LIMIT},
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
    layouts = {
        **config,
        "models": {f"tiny-{LAYOUT_FAMILY}": config["models"][f"tiny-{LAYOUT_FAMILY}"]},
        "intervene": {**config["intervene"], "runs": {}},  # its sweeps name the other models
        "datasets": config["datasets"] | {name: {"source": sources[name]} for name in LAYOUTS},
    }
    (workdir / "config" / "layouts.yaml").write_text(yaml.safe_dump(layouts))
    stores = [
        f"{results}/activations/tiny-{LAYOUT_FAMILY}/{name}/{modality}"
        for name in LAYOUTS
        for modality in ("image", "text")
    ]
    for configfile, targets in (("families.yaml", []), ("layouts.yaml", stores)):
        run_snakemake(
            workdir,
            *targets,
            "--cores",
            "2",
            "--configfile",
            f"config/{configfile}",
            env={"SNAKEMAKE_OUTPUT_CACHE": None},
            timeout=2400,
        )
    n_layers = {f: load(ModelSpec(name=f, path=str(p))).n_layers for f, p in checkpoints.items()}
    return results, n_layers, len(rows)


def test_every_family_runs_through_the_workflow(families_run):
    results, n_layers, _ = families_run
    for family in MODELS:
        name, layers = f"tiny-{family}", list(range(n_layers[family] + 1))
        probe = pd.read_parquet(results / "probe" / name / "pairs.parquet")
        assert sorted(probe["layer"].unique()) == layers, name
        geometry = pd.read_parquet(results / "geometry" / name / "pairs.parquet")
        # geometry skips layer 0 of the last-token pooling by design: there every sample is the
        # template's same last token (vlmlayers geometry --help)
        assert set(layers[1:]) <= set(geometry["layer"]), name
        evaluation = pd.read_parquet(results / "eval" / f"{name}.parquet")
        forms = {"text"} if family == "llama" else {"image", "text"}
        assert set(evaluation["modality"]) == forms, name
        per_form = evaluation[evaluation["subset"] == "all"].groupby(["modality", "metric"])["n"]
        assert (per_form.sum() == EVAL_LIMIT).all(), name  # 'all' rows are per task
        if family == "llama":
            continue
        knockout = pd.read_parquet(results / "intervention" / f"knockout-{family}.parquet")
        windows = knockout.loc[knockout["window_start"] >= 0, "window_start"].unique()
        assert sorted(windows) == layers[:-1], name
        assert (probe["modality_test"] == "image").any(), f"{name}: no image-form probes"
    for kind in ("probe", "id", "overlap", "eval", "intervention"):
        assert (results / "figures" / f"{kind}.png").stat().st_size > 5000


def test_every_layout_gives_the_same_activations(families_run):
    results, n_layers, n_rows = families_run
    stores = results / "activations" / f"tiny-{LAYOUT_FAMILY}"
    for modality in ("image", "text"):
        # a CSV holds one caption per row, so its text form differs by design
        layouts = LAYOUTS if modality == "image" else ("coco", "hf")
        for layer in range(n_layers[LAYOUT_FAMILY] + 1):
            ids, reference = activations.load(stores / "pairs" / modality, layer)
            assert len(ids) == n_rows
            for layout in layouts:
                got_ids, got = activations.load(stores / layout / modality, layer)
                assert list(got_ids) == list(ids), layout
                np.testing.assert_array_equal(got, reference, err_msg=f"{modality} {layout}")
    assert len(pd.read_parquet(results / "data" / "benchmark.parquet")) == 32
