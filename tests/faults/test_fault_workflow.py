"""Faults of a whole workflow run: a kill -9 in the middle of training, what a run may write, and
whether the same config and seed give the same tables."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from workflow_helpers import SnakemakeFailed, copy_workflow, run_test_config, tables_equal

# Loaded by every Python process of the job through PYTHONPATH: `vlmlayers train stage1` kills
# itself with SIGKILL when it asks for the batch of step $KILL_STAGE1_AT_STEP (no handler, no
# cleanup: what a node failure or an OOM killer does).
KILLER = """\
import os, signal, sys
if os.environ.get("KILL_STAGE1_AT_STEP") and sys.argv[1:3] == ["train", "stage1"]:
    from vlmlayers.world import train
    fit, at = train.fit, int(os.environ["KILL_STAGE1_AT_STEP"])
    def killed_at(model, make_batch, out, **kwargs):
        def batch(step):
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return make_batch(step)
        return fit(model, batch, out, **kwargs)
    train.fit = killed_at
"""


def _weights(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def test_kill_minus_nine_in_training_resumes_to_the_same_model(workflow_run, tmp_path):
    _, reference = workflow_run  # the same config/test.yaml, run without faults
    workdir = copy_workflow(tmp_path / "wf")
    shipped = {p.relative_to(workdir) for p in workdir.rglob("*")}
    results = tmp_path / "results"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLER)
    target = results / "models" / "aligned"
    # test.yaml: stage 1 runs 10 steps with a checkpoint every 5; step 8 dies after the first.
    killed = {
        "PYTHONPATH": os.pathsep.join([str(workdir / "src"), str(hook)]),
        "KILL_STAGE1_AT_STEP": "8",
    }
    with pytest.raises(SnakemakeFailed, match="stage1"):
        run_test_config(workdir, results, target, env=killed)
    assert not target.exists(), "a killed job must not leave its output"
    assert any(target.with_name("aligned.partial").rglob("*")), "no checkpoint to resume from"

    run_test_config(workdir, results, target)
    assert "resuming from step 5" in (workdir / "logs" / "stage1.log").read_text()
    got, want = _weights(target), _weights(reference / "models" / "aligned")
    assert got.keys() == want.keys() and got
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # The run wrote its outputs under results_dir, its logs and Snakemake's records, nothing
    # else; no partial or temporary file is left where a later run could take it as done.
    written = {p.relative_to(workdir) for p in workdir.rglob("*")} - shipped
    assert {p.parts[0] for p in written} <= {".snakemake", "logs"}, written
    left = [p for p in results.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert not left, left


def test_same_config_and_seed_give_identical_tables(workflow_run, tmp_path):
    """Probes and geometry recomputed from the same activations, in another results directory,
    equal the first run's tables exactly (test_slurm.py repeats the whole workflow under SLURM
    and compares every table)."""
    workdir, results = workflow_run
    again = tmp_path / "results"
    shutil.copytree(results, again)  # keeps modification times: upstream stays done
    tables = [p for kind in ("probe", "geometry") for p in (again / kind).rglob("*.parquet")]
    for table in tables:
        table.unlink()
    run_test_config(workdir, again, *tables)
    compared = tables_equal(results, again, "[pg][re]*/**/*.parquet", rtol=0, atol=0)
    assert len(compared) == len(tables)
