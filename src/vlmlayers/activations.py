"""The activation store: hive-partitioned Parquet shards per model x dataset x modality.

Layout (DESIGN.md, with a ``tap`` level for the tap point)::

    {root}/manifest.json
    {root}/tap={tap}/layer={l:02d}/part-{k:04d}.parquet   columns: id, pooling, vec
    {root}/prompt_entropy.parquet                          columns: id, tap, layer, entropy

Taps (``vlmlayers.extract``): ``residual`` (layer 0 = the embedding output, layer l the output of
decoder block l), ``mlp_out`` (layer l = block l's MLP output) and one tap per attention head,
``head.HH`` (layer l = head HH's output through block l's output projection); the manifest lists
them (``taps``) with their layers (``layers``: tap -> list). ``vec`` is a fixed-size list of
float16 or float32. ``prompt_entropy.parquet`` (optional) holds the matrix-based entropy of each
prompt's residual token matrix per layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmlayers.io import atomic_path

MANIFEST = "manifest.json"


def shard_path(root: str | os.PathLike, tap: str, layer: int, part: int) -> Path:
    return Path(root) / f"tap={tap}" / f"layer={layer:02d}" / f"part-{part:04d}.parquet"


def write_shard(
    root: str | os.PathLike,
    tap: str,
    layer: int,
    part: int,
    ids: list[str],
    pooled: dict[str, np.ndarray],
    dtype: str = "float32",
) -> Path:
    """Write one shard atomically: for every pooling, one row per id."""
    rows_id, rows_pool, vecs = [], [], []
    for pooling, array in pooled.items():
        if len(array) != len(ids):
            raise ValueError(f"pooling {pooling!r}: {len(array)} vectors for {len(ids)} ids")
        rows_id += list(ids)
        rows_pool += [pooling] * len(ids)
        vecs.append(np.asarray(array, dtype=dtype))
    flat = np.concatenate(vecs) if vecs else np.zeros((0, 0), dtype=dtype)
    dim = flat.shape[1]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
    table = pa.table({"id": pa.array(rows_id, pa.string()), "pooling": rows_pool, "vec": vec})
    path = shard_path(root, tap, layer, part)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no activation manifest (is {root} an extraction output?)")
    return json.loads(path.read_text())


def layers(root: str | os.PathLike, tap: str = "residual") -> list[int]:
    base = Path(root) / f"tap={tap}"
    found = sorted(int(p.name.split("=")[1]) for p in base.glob("layer=*") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"{base}: no layer=NN directories")
    return found


def load(
    root: str | os.PathLike, layer: int, pooling: str = "last", tap: str = "residual"
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ids, X)`` for one layer and pooling, rows in extraction order, X as float32.

    Raises if a vector holds NaN or inf, naming the layer and the sample.
    """
    parts = sorted((Path(root) / f"tap={tap}" / f"layer={layer:02d}").glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{root}: no shards for tap={tap} layer={layer}")
    table = pa.concat_tables(
        pq.read_table(p, filters=[("pooling", "=", pooling)], columns=["id", "vec"]) for p in parts
    )
    if table.num_rows == 0:
        raise KeyError(f"{root}: pooling {pooling!r} not stored at layer {layer}")
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    vec = table.column("vec").combine_chunks()
    X = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), -1).astype(np.float32)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{root}: layer {layer} pooling {pooling!r} has NaN/inf in {int(bad.sum())} samples, "
            f"first id {ids[bad][0]!r}; refusing to analyse"
        )
    return ids, X


def load_paired(
    roots: list[str | os.PathLike], layer: int, pooling: str = "last", tap: str = "residual"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Load the same layer from several stores and check the ids line up row by row."""
    loaded = [load(r, layer, pooling, tap) for r in roots]
    ids = loaded[0][0]
    for root, (other, _) in zip(roots[1:], loaded[1:], strict=True):
        if len(other) != len(ids) or (other != ids).any():
            raise ValueError(f"ids of {root} do not line up with those of {roots[0]}")
    return ids, [X for _, X in loaded]
