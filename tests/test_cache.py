"""Between-workflow result cache (SNAKEMAKE_OUTPUT_CACHE): a second checkout with the same config
takes the expensive rules' outputs from the cache instead of recomputing them; what the key
covers (parameters, a checkpoint's weights) and concurrent writers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from families import build_tiny
from safetensors.torch import load_file, save_file
from workflow_helpers import copy_workflow, points_into, ran, run_snakemake, snakemake_env

from vlmlayers import activations

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
    assert ran(first, "stage1")
    assert points_into(first / TARGET, cache), "stage1's output was not stored in the cache"
    assert n_entries >= len(CACHED)


def test_second_checkout_takes_them_from_the_cache(filled_cache, tmp_path):
    cache, _, n_entries = filled_cache
    second = copy_workflow(tmp_path / "second")
    result = _run(second, cache)
    text = result.stdout + result.stderr
    assert "Symlinking output file results/models/aligned/model.safetensors from cache" in text
    for rule in CACHED:
        assert not ran(second, rule), f"{rule} ran again"
    assert points_into(second / TARGET, cache)
    assert points_into(second / "results" / "world" / "train.parquet", cache)
    assert len(list(cache.iterdir())) == n_entries  # nothing new was stored


def test_jobs_of_one_rule_get_their_own_entries(filled_cache, tmp_path):
    """Extraction of one model's image and text forms: one shell command and the same input
    files, so only the wildcards tell the jobs apart; each must get its own entry (Snakemake
    keys a job by the unformatted command and params: `cache_key` puts the wildcards there)."""
    cache, _, n_entries = filled_cache
    second = copy_workflow(tmp_path / "second")
    stores = [f"results/activations/aligned/tinyworld/{m}" for m in ("image", "text")]
    args = ("--cores", "2", "--configfile", "config/test.yaml", "--cache", *CACHED, "extract")
    run_snakemake(second, *stores, *args, env={"SNAKEMAKE_OUTPUT_CACHE": cache}, timeout=900)
    targets = [Path(os.path.realpath(second / s)) for s in stores]
    assert all(t.is_relative_to(cache.resolve()) for t in targets)
    assert targets[0] != targets[1], "image and text extraction share one cache entry"
    for store, modality in zip(stores, ("image", "text"), strict=True):
        assert activations.read_manifest(second / store)["modality"] == modality
    assert len(list(cache.iterdir())) == n_entries + 2


def test_changed_parameter_misses_the_cache(filled_cache, tmp_path):
    """The cache key covers parameters: more stage-1 steps is a new entry, not a stale hit."""
    cache, _, _ = filled_cache
    second = copy_workflow(tmp_path / "second")
    config = second / "config" / "test.yaml"
    config.write_text(config.read_text().replace("stage1: {steps: 10,", "stage1: {steps: 12,"))
    _run(second, cache)
    assert ran(second, "stage1"), "stage1 was taken from a stale entry"
    assert not ran(second, "pretrain_base")  # upstream still cached


def _own_model_config(workdir: Path, checkpoint: Path, rows: Path) -> str:
    """A bring-your-own config: a local checkpoint directory and a prepared dataset."""
    config = {
        "results_dir": "results",
        "world": None,
        "models": {"mine": {"path": str(checkpoint), "family": "llava"}},
        "datasets": {"pairs": {"source": {"format": "table", "path": str(rows)}}},
        "extract": {"batch_size": 8, "poolings": ["last"]},
    }
    (workdir / "config" / "own.yaml").write_text(yaml.safe_dump(config))
    return "config/own.yaml"


def _extract_cached(workdir: Path, cache: Path, configfile: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", "results/activations/mine/pairs/image"]
        + ["--cores", "1", "--configfile", configfile, "--cache", "extract", "prepare_data"],
        cwd=workdir,
        env=snakemake_env(workdir, {"SNAKEMAKE_OUTPUT_CACHE": cache}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_own_checkpoint_is_keyed_by_its_weights(tiny_world, tmp_path):
    """A local checkpoint directory (not made by the workflow) enters the cache key by content:
    two checkouts storing the same entry at once leave one valid entry, an unchanged checkpoint
    is a hit, and changed weights are a miss."""
    checkpoint = build_tiny("llava", tmp_path / "ckpt")
    rows = tmp_path / "rows.parquet"
    pd.read_parquet(tiny_world / "analysis.parquet").to_parquet(rows)
    cache = tmp_path / "cache"
    cache.mkdir()
    checkouts = [copy_workflow(tmp_path / name) for name in ("a", "b", "c", "d")]
    configs = [_own_model_config(w, checkpoint, rows) for w in checkouts]
    store = "results/activations/mine/pairs/image"

    # Two workflows store the same entries concurrently.
    racing = [_extract_cached(w, cache, c) for w, c in zip(checkouts[:2], configs, strict=False)]
    for proc in racing:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
    entries = sorted(cache.iterdir())
    assert len(entries) == 2  # prepare_data and extract, once each
    first = activations.load(checkouts[0] / store, 1)[1]
    np.testing.assert_array_equal(activations.load(checkouts[1] / store, 1)[1], first)

    hit = _extract_cached(checkouts[2], cache, configs[2])
    assert "from cache" in hit.communicate(timeout=600)[0] and hit.returncode == 0
    assert not ran(checkouts[2], "extract/mine/pairs/image")

    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "layers.0" in k and k.endswith("weight"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    miss = _extract_cached(checkouts[3], cache, configs[3])
    assert miss.communicate(timeout=600)[0] and miss.returncode == 0
    assert ran(checkouts[3], "extract/mine/pairs/image"), "changed weights hit a stale entry"
    assert len(list(cache.iterdir())) == 3
    changed = activations.load(checkouts[3] / store, 1)[1]
    assert not np.array_equal(changed, first)
