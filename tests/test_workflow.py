"""The workflow end to end on config/test.yaml, incremental reruns and lint."""

from __future__ import annotations

import re

import pandas as pd
from workflow_helpers import copy_workflow, run_snakemake

DRY = ("-n", "--cores", "2", "--configfile", "config/test.yaml")


def _planned(workdir, results, *extra) -> set[str] | str:
    """The rules a dry run would execute (from its job-stats table), or its message."""
    result = run_snakemake(workdir, *DRY, *extra, "--config", f"results_dir={results}")
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return text
    return set(re.findall(r"^(\w+)\s+\d+$", text, re.M)) - {"total"}


def _planned_with(workdir, results, name: str, override: str) -> set[str] | str:
    """The dry run of config/test.yaml with ``override`` (YAML) layered on top."""
    path = workdir / name
    path.write_text(override)
    return _planned(workdir, results, "--configfile", "config/test.yaml", str(path))


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


def test_interventions_and_finetune_tables(workflow_run):
    _, results = workflow_run
    # config/test.yaml replaces config/config.yaml: only its own two sweeps run
    assert {p.stem for p in (results / "intervention").glob("*.parquet")} == {
        "knockout",
        "transplant",
    }
    knockout = pd.read_parquet(results / "intervention" / "knockout.parquet")
    windows = knockout.loc[knockout["window_start"] >= 0, ["window_start", "window_end"]]
    assert sorted(map(tuple, windows.drop_duplicates().to_numpy())) == [(0, 1), (2, 3)]
    baseline = knockout[knockout["window_start"] < 0]
    assert (baseline["delta"] == 0).all()
    finetune = pd.read_parquet(results / "finetune.parquet")
    assert set(finetune["variant"]) == {"full", "middle"}
    assert set(finetune["comparison"]) == {"equal_steps", "equal_time", "curve"}
    assert set(finetune["modality"]) == {"image", "text"}
    evaluated = pd.read_parquet(results / "eval" / "tuned.parquet")  # through lmms-eval
    assert set(evaluated["task"]) == {"vision", "knowledge", "caption"}
    assert evaluated.query("task == 'caption'")["metric"].tolist() == ["cider"]
    verdicts = pd.read_parquet(results / "claims.parquet").set_index("claim")["evidence"]
    assert "middle" in verdicts["selective_ft"] and "full" in verdicts["selective_ft"]
    for kind in ("intervention", "finetune"):
        assert (results / "figures" / f"{kind}.png").stat().st_size > 5000


def test_finetune_scoring_parameter_does_not_retrain(workflow_run):
    workdir, results = workflow_run
    planned = _planned_with(workdir, results, "ft_boot.yaml", "finetune: {n_boot: 7}\n")
    assert "finetune_score" in planned
    assert not planned & {"finetune_train", "stage2", "extract", "intervene", "probe"}


def test_noop_rerun_does_nothing(workflow_run):
    workdir, results = workflow_run
    assert "Nothing to be done" in _planned(workdir, results)


def test_probe_parameter_reruns_only_probes(workflow_run):
    workdir, results = workflow_run
    planned = _planned_with(workdir, results, "more_boot.yaml", "probe: {n_boot: 7}\n")
    assert "probe" in planned
    assert not planned & {"extract", "stage1", "stage2", "world", "geometry", "evaluate"}


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
    assert not planned & {"extract", "stage1", "stage2", "world", "probe", "evaluate"}


def test_lint_is_clean(workflow_run):
    workdir, results = workflow_run
    result = run_snakemake(
        workdir, "--lint", "--configfile", "config/test.yaml", "--config", f"results_dir={results}"
    )
    assert "Lints for" not in result.stdout + result.stderr


GPU_RULES = {"extract", "evaluate", "intervene", "finetune_train", "finetune_score"}


def _job_resources(dry_run: str) -> list[tuple[str, str]]:
    """(rule, its ``resources:`` line) for every job in a dry run's listing, local rules too."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        resources = re.search(r"resources: (.*)", block)
        if rule and resources:
            jobs.append((rule[1], resources[1]))
    return jobs


def test_paper_config_plans_every_stage_offline(tmp_path):
    """config/paper.yaml's dry run builds the whole DAG without the network, the models or the
    data, and asks for a GPU on the model-running rules only."""
    workdir = copy_workflow(tmp_path / "wf")
    result = run_snakemake(workdir, "-n", "--cores", "8", "--configfile", "config/paper.yaml")
    text = result.stdout + result.stderr
    planned = set(re.findall(r"^(\w+)\s+\d+$", text, re.M)) - {"total"}
    stages = {"prepare_data", "probe", "geometry", "finetune_table", "claims", *GPU_RULES}
    assert stages <= planned
    for rule, resources in _job_resources(text):
        assert ("gpu=1" in resources) == (rule in GPU_RULES), f"{rule}: {resources}"


WORLD_TRAINING_RULES = {"pretrain_base", "pretrain_vision", "stage1", "stage2"}


def test_world_gpu_setting_asks_for_a_gpu_on_the_training_rules_only(tmp_path):
    """``world.gpu: 1`` (retraining on a GPU cluster) reaches the scheduler as each training
    job's ``gpu`` resource; the analyses of the tiny world stay on CPU cores."""
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "gpu.yaml").write_text("world:\n  pretrained: null\n  gpu: 1\n")
    config = ("--configfile", "config/config.yaml", "gpu.yaml")
    result = run_snakemake(workdir, "-n", "--cores", "2", *config)
    text = result.stdout + result.stderr
    asked = {rule for rule, resources in _job_resources(text) if "gpu=1" in resources}
    assert asked == WORLD_TRAINING_RULES, text[-2000:]
