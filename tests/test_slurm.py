"""The workflow gives the same tables under SLURM (profiles/slurm) as locally (profiles/default).

The tests marked `slurm` need a running SLURM cluster: CI runs `.ci/slurm/start.sh` (as root)
first; without one they skip and say why. Run them with `pytest -m slurm tests/test_slurm.py`.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, points_into, ran, run_snakemake, tables_equal

USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
START_HINT = "start one with `.ci/slurm/start.sh` (as root)"
# Snakemake loads profiles/default implicitly as the workflow profile of every run next to the
# Snakefile, and its `cores: all` would cap SLURM jobs' CPUs: SLURM runs switch it off.
SLURM_ARGS = (
    "--profile",
    "profiles/slurm",
    "--workflow-profile",
    "none",
    "--slurm-keep-successful-logs",
)
LOCAL_ARGS = ("--profile", "profiles/default")
# Columns that differ between any two runs (training cost of the fine-tuning tables): not
# compared.
VOLATILE_COLUMNS = (
    "seconds", "train_seconds", "step_seconds", "samples_per_second", "peak_mem_mb", "wall_s",
)  # fmt: skip
# The SLURM run of config/test.yaml makes these outputs, so that every rule that goes through
# SLURM runs (once per kind of job: one model's extraction, probes and geometry, both sweeps,
# one fine-tuning variant) and one figure, a local rule like the other rules that gather small
# tables. On the 2-core CI node these 15 jobs took 13 min; the whole DAG (43 jobs) was on course
# for ~50 min, most of CI's time. tests/test_workflow.py runs all of it locally.
SLURM_TARGETS = (
    "probe/tuned/tinyworld.parquet",
    "geometry/tuned/tinyworld.parquet",
    "eval/tuned.parquet",
    "finetune/middle/seed0.parquet",
    "figures/intervention.png",
)
# The toy workflow's runs must not share outputs through Snakemake's between-workflow cache.
RUN_ENV = {"SNAKEMAKE_OUTPUT_CACHE": None}


@pytest.fixture(scope="session")
def slurm_cluster() -> list[str]:
    """Skip unless `sinfo` exists and shows a node that can run jobs; return the node states."""
    for tool in ("sinfo", "sbatch", "squeue"):
        if shutil.which(tool) is None:
            pytest.skip(f"SLURM is not installed (no `{tool}` on PATH): {START_HINT}")
    try:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"SLURM cluster is not up (`sinfo` timed out): {START_HINT}")
    if proc.returncode != 0:
        pytest.skip(
            f"SLURM cluster is not up (`sinfo` exit {proc.returncode}: "
            f"{proc.stderr.strip()[-300:]}): {START_HINT}"
        )
    states = proc.stdout.split()
    # sinfo flags states with a suffix: * not responding, ~ powered off, # powering up, ...
    if not any(s.rstrip("*~#!%$@^-") in USABLE_NODE_STATES for s in states):
        pytest.skip(f"SLURM cluster has no usable node (states: {states or 'none'}): {START_HINT}")
    return states


def _slurm_job_logs(workdir: Path) -> dict[str, list[Path]]:
    """The executor plugin's per-job logs, by rule: .snakemake/slurm_logs/rule_<name>/<id>.log."""
    logs: dict[str, list[Path]] = {}
    for log in sorted((workdir / ".snakemake" / "slurm_logs").glob("rule_*/**/*.log")):
        rule = log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0][len("rule_") :]
        logs.setdefault(rule, []).append(log)
    return logs


def run_local_and_slurm(tmp_path: Path, setup, *args: str) -> tuple[Path, Path, Path]:
    """Run the workflow twice, locally and under SLURM, each in its own copy made by
    `setup(dest)`, with results in separate directories. Returns (local results, SLURM
    results, SLURM workdir)."""
    results = {}
    for kind, profile_args in (("local", LOCAL_ARGS), ("slurm", SLURM_ARGS)):
        workdir = setup(tmp_path / f"wf-{kind}")
        results[kind] = tmp_path / f"results-{kind}"
        run_snakemake(
            workdir,
            *profile_args,
            *args,
            "--config",
            f"results_dir={results[kind]}",
            env=RUN_ENV,
            timeout=3600,
        )
    return results["local"], results["slurm"], tmp_path / "wf-slurm"


# Every cacheable rule of config/test.yaml, named as non-local executors need (DESIGN.md).
CACHED_RULES = (
    "world", "pretrain_base", "pretrain_vision", "stage1", "stage2", "finetune_train", "extract",
)  # fmt: skip
# The rules SLURM_TARGETS submit: the cacheable ones and the analyses that are not.
SLURM_RULES = {*CACHED_RULES, "probe", "geometry", "evaluate", "intervene", "finetune_score"}


def _slurm_run(workdir: Path, cache: Path, *targets: str) -> None:
    """config/test.yaml under SLURM in `workdir` (results in its results/), with the
    between-workflow cache in `cache`."""
    run_snakemake(
        workdir,
        *targets,
        *SLURM_ARGS,
        "--configfile",
        "config/test.yaml",
        "--cache",
        *CACHED_RULES,
        env={"SNAKEMAKE_OUTPUT_CACHE": cache},
        timeout=3600,
    )


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory) -> tuple[Path, Path]:
    """The whole test.yaml workflow under SLURM, storing its cacheable rules in a fresh
    cache: (workdir, cache)."""
    base = tmp_path_factory.mktemp("slurm")
    cache = base / "cache"
    cache.mkdir()
    workdir = copy_workflow(base / "first")
    _slurm_run(workdir, cache, *(f"results/{target}" for target in SLURM_TARGETS))
    return workdir, cache


@pytest.mark.slurm
def test_workflow_under_slurm_matches_local(slurm_run, workflow_run):
    """The real pipeline on config/test.yaml: the SLURM run's Parquet tables (every rule that
    SLURM runs, once) equal the local run's."""
    _, local = workflow_run
    workdir, cache = slurm_run
    slurm = workdir / "results"
    submitted = set(_slurm_job_logs(workdir))
    assert submitted == SLURM_RULES, f"SLURM job logs: {sorted(submitted)}"
    assert points_into(slurm / "models" / "tuned", cache), "stage2 was not stored in the cache"
    compared = tables_equal(local, slurm, ignore_columns=VOLATILE_COLUMNS, second_is_subset=True)
    tables = {t for t in SLURM_TARGETS if t.endswith(".parquet")}
    sweeps = {f"intervention/{run}.parquet" for run in ("knockout", "transplant")}
    assert tables | sweeps | {"world/train.parquet"} <= set(compared), sorted(compared)
    assert (slurm / "figures" / "intervention.png").stat().st_size > 5000  # made by a local rule


@pytest.mark.slurm
def test_second_checkout_under_slurm_takes_the_cache(slurm_run, tmp_path):
    """A colleague's checkout with the same config and cache: its SLURM jobs link the cached
    checkpoints and activations instead of recomputing them. Checkpoints reach cacheable
    rules as their digest files, which a job step can hash (it hashes every input by content
    and cannot read a directory)."""
    _, cache = slurm_run
    n_entries = len(list(cache.iterdir()))
    second = copy_workflow(tmp_path / "second")
    store = "results/activations/tuned/tinyworld/image"
    _slurm_run(second, cache, "results/models/aligned", store)
    assert set(_slurm_job_logs(second)) >= {"world", "stage1", "extract"}, "jobs bypassed SLURM"
    for rule in ("world", "pretrain_base", "pretrain_vision", "stage1", "stage2"):
        assert not ran(second, rule), f"{rule} ran again"
    assert not ran(second, "extract/tuned/tinyworld/image"), "extraction ran again"
    for output in ("models/aligned", "models/tuned", "world/train.parquet"):
        assert points_into(second / "results" / output, cache), output
    assert points_into(second / store, cache)
    assert len(list(cache.iterdir())) == n_entries  # nothing new was stored


# A two-rule stand-in for the pipeline: checks the SLURM profile, the cluster (GPU gres
# included) and the comparison logic above, independently of the real workflow.
TOY_SNAKEFILE = textwrap.dedent(
    '''
    RESULTS = config.get("results_dir", "results")


    rule all:
        input:
            f"{RESULTS}/summary.parquet",


    rule make_table:
        output:
            f"{RESULTS}/tables/data.parquet",
        log:
            "logs/make_table.log",
        threads: 1
        resources:
            mem_mb=300,
            runtime=5,
        params:
            n=config["n"],
        shell:
            """python -c 'import numpy as np, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
    n = {params.n}
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((n, 4)).astype("float32")
    t = pa.table(dict(id=[f"s{{i}}" for i in range(n)], value=rng.standard_normal(n),
                      vec=pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 4)))
    pq.write_table(t, "{output}")' 2> {log}"""


    rule gpu_summary:
        input:
            rules.make_table.output,
        output:
            f"{RESULTS}/summary.parquet",
            where="where.txt",
        log:
            "logs/gpu_summary.log",
        threads: 2
        resources:
            mem_mb=500,
            runtime=5,
            gpu=1,
        shell:
            """echo "job=${{SLURM_JOB_ID:-}} gpus=${{CUDA_VISIBLE_DEVICES:-}}" \\
        "cpus=${{SLURM_CPUS_PER_TASK:-}}" > {output.where}
    python -c 'import pandas as pd
    df = pd.read_parquet("{input}")
    pd.DataFrame(dict(metric=["mean", "sd"], value=[df.value.mean(), df.value.std()])
                 ).to_parquet("{output[0]}")' 2> {log}"""
    '''
)


def _toy_workflow(dest: Path) -> Path:
    copy_workflow(dest, parts=("profiles",))
    (dest / "Snakefile").write_text(TOY_SNAKEFILE)
    (dest / "config").mkdir(exist_ok=True)
    (dest / "config" / "test.yaml").write_text("n: 50\n")
    return dest


@pytest.mark.slurm
def test_toy_workflow_under_slurm_matches_local(slurm_cluster, tmp_path):
    local, slurm, workdir = run_local_and_slurm(
        tmp_path, _toy_workflow, "--configfile", "config/test.yaml"
    )
    logs = _slurm_job_logs(workdir)
    assert set(logs) == {"make_table", "gpu_summary"}, f"SLURM job logs: {logs}"
    where = dict(kv.split("=", 1) for kv in (workdir / "where.txt").read_text().split())
    assert where["job"], "gpu_summary did not run inside a SLURM job"
    assert where["gpus"], "gpu_summary got no GPU (CUDA_VISIBLE_DEVICES unset)"
    assert where["cpus"] == "2", f"gpu_summary asked for 2 threads, SLURM gave {where['cpus']}"
    assert tables_equal(local, slurm) == ["summary.parquet", "tables/data.parquet"]


def test_tables_equal_catches_differences(tmp_path):
    """The comparison itself (no cluster needed): equal, different, missing, empty."""
    import numpy as np
    import pandas as pd

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "t").mkdir(parents=True)
    df = pd.DataFrame({"id": ["x", "y"], "value": [1.0, 2.0], "vec": [np.ones(3), np.zeros(3)]})
    df.to_parquet(a / "t" / "x.parquet")
    df.assign(value=[1.0, 2.0 + 1e-9]).to_parquet(b / "t" / "x.parquet")
    assert tables_equal(a, b) == ["t/x.parquet"]

    df.assign(vec=[np.ones(3), np.full(3, 0.5)]).to_parquet(b / "t" / "x.parquet")
    with pytest.raises(AssertionError, match="vec"):
        tables_equal(a, b)
    df.assign(value=[1.0, 3.0]).to_parquet(b / "t" / "x.parquet")
    with pytest.raises(AssertionError, match="value"):
        tables_equal(a, b)
    df.to_parquet(b / "t" / "x.parquet")
    df.to_parquet(b / "extra.parquet")
    with pytest.raises(AssertionError, match="only in the second"):
        tables_equal(a, b)
    with pytest.raises(AssertionError, match="only in the second"):
        tables_equal(a, b, second_is_subset=True)  # a subset still needs each of its tables
    assert tables_equal(b, a, second_is_subset=True) == ["t/x.parquet"]
    with pytest.raises(AssertionError, match="no tables"):
        tables_equal(a, b, pattern="**/*.csv")
