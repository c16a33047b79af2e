"""The workflow end to end on config/test.yaml, incremental reruns and lint."""

from __future__ import annotations

import pandas as pd
from workflow_helpers import run_snakemake

DRY = ("-n", "--cores", "2", "--configfile", "config/test.yaml", "--quiet", "rules")


def _planned(workdir, results, *extra) -> str:
    result = run_snakemake(workdir, *DRY, "--config", f"results_dir={results}", *extra)
    return result.stdout + result.stderr


def test_every_table_is_produced(workflow_run):
    _, results = workflow_run
    evals = {
        m: pd.read_parquet(results / "eval" / f"{m}.parquet") for m in ("base", "aligned", "tuned")
    }
    assert set(evals["base"]["modality"]) == {"text"}
    assert set(evals["tuned"]["modality"]) == {"image", "text"}
    for model in ("base", "aligned", "tuned"):
        probe = pd.read_parquet(results / "probe" / model / "tinyworld.parquet")
        geometry = pd.read_parquet(results / "geometry" / model / "tinyworld.parquet")
        assert len(probe) and len(geometry)
        assert set(probe["model"]) == {model}
        assert probe["accuracy"].between(0, 1).all()
    tuned = pd.read_parquet(results / "geometry" / "tuned" / "tinyworld.parquet")
    assert "neighbour_overlap" in set(tuned["metric"])
    assert (results / "activations" / "tuned" / "tinyworld" / "image" / "manifest.json").exists()


def test_noop_rerun_does_nothing(workflow_run):
    workdir, results = workflow_run
    assert "Nothing to be done" in _planned(workdir, results)


def test_probe_parameter_reruns_only_probes(workflow_run):
    workdir, results = workflow_run
    planned = _planned(workdir, results, "probe={'n_boot': 7}")
    assert "probe" in planned
    for upstream in ("extract", "stage1", "stage2", "world", "geometry", "evaluate"):
        assert f"{upstream} " not in planned.replace("\n", " "), planned


def test_geometry_code_edit_reruns_only_geometry(workflow_run):
    workdir, results = workflow_run
    module = workdir / "src" / "vlmlayers" / "geometry.py"
    original = module.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        planned = _planned(workdir, results)
    finally:
        module.write_text(original)
    assert "geometry" in planned
    for upstream in ("extract", "stage1", "stage2", "world", "probe", "evaluate"):
        assert f"{upstream} " not in planned.replace("\n", " "), planned


def test_lint_is_clean(workflow_run):
    workdir, results = workflow_run
    result = run_snakemake(
        workdir, "--lint", "--configfile", "config/test.yaml", "--config", f"results_dir={results}"
    )
    assert "Lints for" not in result.stdout + result.stderr
