"""Between-workflow result cache (SNAKEMAKE_OUTPUT_CACHE): a second checkout with the same config
takes the expensive rules' outputs from the cache instead of recomputing them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, run_snakemake

# The cacheable rules up to the aligned VLM, named explicitly as non-local executors need.
CACHED = ("world", "pretrain_base", "pretrain_vision", "stage1")
TARGET = "results/models/aligned"


def _run(workdir: Path, cache: Path):
    return run_snakemake(
        workdir,
        TARGET,
        "--cores",
        "2",
        "--configfile",
        "config/test.yaml",
        "--cache",
        *CACHED,
        env={"SNAKEMAKE_OUTPUT_CACHE": cache},
        timeout=900,
    )


def _ran(workdir: Path, rule: str) -> bool:
    """The rule's job ran: its log has output (Snakemake touches the log of a cached job too)."""
    log = workdir / "logs" / f"{rule}.log"
    return log.exists() and log.stat().st_size > 0


def _points_into(path: Path, cache: Path) -> bool:
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


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory) -> tuple[Path, Path, int]:
    """A first checkout's run that stored the cached rules: (cache, workdir, entries)."""
    base = tmp_path_factory.mktemp("cache")
    cache = base / "cache"
    cache.mkdir()
    first = copy_workflow(base / "first")
    _run(first, cache)
    return cache, first, len(list(cache.iterdir()))


def test_first_run_stores_the_cached_rules(filled_cache):
    cache, first, n_entries = filled_cache
    assert _ran(first, "stage1")
    assert _points_into(first / TARGET, cache), "stage1's output was not stored in the cache"
    assert n_entries >= len(CACHED)


def test_second_checkout_takes_them_from_the_cache(filled_cache, tmp_path):
    cache, _, n_entries = filled_cache
    second = copy_workflow(tmp_path / "second")
    result = _run(second, cache)
    text = result.stdout + result.stderr
    assert "Symlinking output file results/models/aligned/model.safetensors from cache" in text
    for rule in CACHED:
        assert not _ran(second, rule), f"{rule} ran again"
    assert _points_into(second / TARGET, cache)
    assert _points_into(second / "results" / "world" / "train.parquet", cache)
    assert len(list(cache.iterdir())) == n_entries  # nothing new was stored


def test_changed_parameter_misses_the_cache(filled_cache, tmp_path):
    """The cache key covers parameters: more stage-1 steps is a new entry, not a stale hit."""
    cache, _, _ = filled_cache
    second = copy_workflow(tmp_path / "second")
    config = second / "config" / "test.yaml"
    config.write_text(config.read_text().replace("stage1: {steps: 10,", "stage1: {steps: 12,"))
    _run(second, cache)
    assert _ran(second, "stage1"), "stage1 was taken from a stale entry"
    assert not _ran(second, "pretrain_base")  # upstream still cached
