"""Helpers for tests that run the Snakemake workflow end to end.

- `copy_workflow` copies the workflow (Snakefile, workflow/, config/, profiles/, src/) into a
  scratch directory so that a run never touches the checkout's results/ or .snakemake/.
- `run_snakemake` runs Snakemake there with the test environment (this interpreter's
  bin/ on PATH, Hugging Face offline) and raises with the output's tail when it fails.
- `tables_equal` compares every Parquet table under two result directories.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "workflow", "config", "profiles", "src", "envs", "models")
_IGNORE = shutil.ignore_patterns(
    "results", ".snakemake", "logs", "benchmarks", "__pycache__", "*.egg-info", ".pytest_cache"
)
TAIL_CHARS = 6000


class SnakemakeFailed(AssertionError):
    """Snakemake exited non-zero (or ran out of time); the message has the output's tail."""


def copy_workflow(
    dest: str | os.PathLike, parts: Iterable[str] = WORKFLOW_PARTS, repo: Path = REPO
) -> Path:
    """Copy the workflow's files from `repo` into `dest` (created); missing parts are skipped.

    Generated outputs (results/, .snakemake/, logs/, caches) are left behind.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:
        src = repo / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=_IGNORE, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


def snakemake_env(workdir: str | os.PathLike | None = None, env: Mapping | None = None) -> dict:
    """The environment for a workflow run.

    This interpreter's bin/ (the virtualenv with snakemake, vlmlayers and the SLURM plugin)
    goes first on PATH, so jobs that SLURM starts find the same tools; Hugging Face is
    offline; `<workdir>/src` (when present) goes first on PYTHONPATH so jobs import the
    copied package. `env` entries are applied last; a value of None removes the variable.
    """
    out = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    out["PATH"] = os.pathsep.join([bindir, out.get("PATH", "")]).rstrip(os.pathsep)
    out["HF_HUB_OFFLINE"] = "1"
    out["HF_DATASETS_OFFLINE"] = "1"
    if workdir is not None and (Path(workdir) / "src").is_dir():
        src = str(Path(workdir).resolve() / "src")
        out["PYTHONPATH"] = os.pathsep.join([src, out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = str(value)
    return out


def _tail(text: str, n: int = TAIL_CHARS) -> str:
    text = text or ""
    return text if len(text) <= n else "[...]\n" + text[-n:]


def _slurm_log_tails(workdir: Path, n_files: int = 2, n_chars: int = 2000) -> str:
    logs = sorted(
        (workdir / ".snakemake" / "slurm_logs").glob("**/*.log"), key=lambda p: p.stat().st_mtime
    )
    parts = []
    for log in logs[-n_files:]:
        text = _tail(log.read_text(errors="replace"), n_chars)
        parts.append(f"--- {log.relative_to(workdir)}\n{text}")
    return "\n".join(parts)


def run_snakemake(
    workdir: str | os.PathLike,
    *args: str,
    env: Mapping | None = None,
    timeout: float | None = 1800,
) -> subprocess.CompletedProcess:
    """Run `python -m snakemake *args` in `workdir`; return the CompletedProcess.

    `env` adds to (None: removes from) the test environment of `snakemake_env`. Raises
    `SnakemakeFailed` with the tail of stdout/stderr (and of the newest SLURM job logs) when
    Snakemake exits non-zero or runs past `timeout` seconds; on a timeout Snakemake first
    gets SIGTERM so that it cancels the SLURM jobs it submitted.
    """
    workdir = Path(workdir)
    cmd = [sys.executable, "-m", "snakemake", *map(str, args)]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=snakemake_env(workdir, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if timed_out or result.returncode != 0:
        what = f"timed out after {timeout} s" if timed_out else f"exit {result.returncode}"
        msg = [
            f"snakemake {what} in {workdir}",
            f"command: {' '.join(cmd)}",
            f"--- stdout (tail)\n{_tail(stdout)}",
            f"--- stderr (tail)\n{_tail(stderr)}",
        ]
        slurm = _slurm_log_tails(workdir)
        if slurm:
            msg.append(f"--- newest SLURM job logs\n{slurm}")
        raise SnakemakeFailed("\n".join(msg))
    return result


def run_test_config(
    workdir: str | os.PathLike,
    results: str | os.PathLike,
    *targets: str | os.PathLike,
    env: Mapping | None = None,
    timeout: float | None = 1800,
) -> subprocess.CompletedProcess:
    """`run_snakemake` on config/test.yaml with results in `results`, locally on 2 cores and
    without the between-workflow cache; `env` adds to that."""
    return run_snakemake(
        workdir,
        *map(str, targets),
        "--cores",
        "2",
        "--configfile",
        "config/test.yaml",
        "--config",
        f"results_dir={results}",
        env={"SNAKEMAKE_OUTPUT_CACHE": None} | dict(env or {}),
        timeout=timeout,
    )


def ran(workdir: Path, rule: str) -> bool:
    """The rule's job ran its command: its log (logs/<rule>.log) has output (Snakemake only
    touches the log of a job it takes from the between-workflow cache)."""
    log = workdir / "logs" / f"{rule}.log"
    return log.exists() and log.stat().st_size > 0


def points_into(path: Path, cache: Path) -> bool:
    """``path`` (a file, or every entry of a directory output) is a symlink into ``cache``."""
    entries = (
        [e for e in path.iterdir() if e.name != ".snakemake_timestamp"]  # Snakemake's own marker
        if path.is_dir() and not path.is_symlink()
        else [path]
    )
    return bool(entries) and all(
        e.is_symlink() and Path(os.path.realpath(e)).is_relative_to(cache.resolve())
        for e in entries
    )


def _is_array_column(series: pd.Series) -> bool:
    if series.dtype != object:
        return False
    first = next((v for v in series if v is not None), None)
    return isinstance(first, (np.ndarray, list, tuple))


def _tables(root: Path, pattern: str) -> set[str]:
    """Relative paths of the files matching `pattern` under `root`, through symlinked folders
    too (outputs taken from the between-workflow cache are links into it)."""
    return {
        Path(p).relative_to(root).as_posix()
        for p in glob.glob(str(root / pattern), recursive=True)
        if Path(p).is_file()
    }


def tables_equal(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    pattern: str = "**/*.parquet",
    *,
    ignore_columns: Iterable[str] = (),
    exclude: Iterable[str] = (),
    second_is_subset: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    **assert_kwargs,
) -> list[str]:
    """Assert that both directories hold the same Parquet tables with equal contents.

    Files are matched by their path relative to each directory (`pattern` is a glob). Each
    pair is compared with `pandas.testing.assert_frame_equal` (extra keyword arguments go to
    it; floats within `rtol`/`atol`); vector cells (Arrow list columns, e.g. activations'
    `vec`) are stacked and compared with the same tolerances. `ignore_columns` drops columns
    such as wall-clock timings before comparing; `exclude` skips files (relative paths) that a
    caller compares its own way; `second_is_subset` compares only the tables of `dir_b` (a run
    of some targets), each of which `dir_a` must hold too. Raises AssertionError naming the first
    differing file, or when no table matches at all (so an empty run cannot pass). Returns
    the compared relative paths.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    skip = set(exclude)
    files_a, files_b = (_tables(d, pattern) - skip for d in (dir_a, dir_b))
    if not files_a and not files_b:
        raise AssertionError(f"no tables match {pattern!r} under {dir_a} or {dir_b}")
    if second_is_subset:
        files_a &= files_b
    if files_a != files_b:
        raise AssertionError(
            f"different tables under {dir_a} and {dir_b}: "
            f"only in the first {sorted(files_a - files_b)}, "
            f"only in the second {sorted(files_b - files_a)}"
        )
    ignore = list(ignore_columns)
    for rel in sorted(files_a):
        a = pd.read_parquet(dir_a / rel)
        b = pd.read_parquet(dir_b / rel)
        a = a.drop(columns=[c for c in ignore if c in a.columns])
        b = b.drop(columns=[c for c in ignore if c in b.columns])
        try:
            if list(a.columns) != list(b.columns):
                raise AssertionError(f"columns differ: {list(a.columns)} != {list(b.columns)}")
            vec_cols = [c for c in a.columns if _is_array_column(a[c]) or _is_array_column(b[c])]
            for col in vec_cols:
                va = np.stack([np.asarray(v) for v in a[col]]) if len(a) else np.empty(0)
                vb = np.stack([np.asarray(v) for v in b[col]]) if len(b) else np.empty(0)
                if va.dtype.kind in "fciu" and vb.dtype.kind in "fciu":
                    np.testing.assert_allclose(
                        va, vb, rtol=rtol, atol=atol, err_msg=f"column {col!r}"
                    )
                else:  # lists of strings (e.g. the world's caption paraphrases): exact
                    np.testing.assert_array_equal(va, vb, err_msg=f"column {col!r}")
            pd.testing.assert_frame_equal(
                a.drop(columns=vec_cols),
                b.drop(columns=vec_cols),
                rtol=rtol,
                atol=atol,
                **assert_kwargs,
            )
        except AssertionError as err:
            raise AssertionError(f"{rel}: {dir_a / rel} != {dir_b / rel}\n{err}") from None
    return sorted(files_a)
