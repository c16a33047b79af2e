"""Atomic file output and content hashing: no half-written file is visible under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``final`` only if the block succeeds.

    The temporary lives in the same directory, so the rename is atomic on POSIX file systems.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def hash_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """SHA-256 over the bytes of ``paths`` in the given order (names excluded)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def tree_files(root: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The files under ``root`` matching ``pattern``, sorted; hidden ones (a name part starting
    with ".", such as Snakemake's ``.snakemake_timestamp``) left out."""
    root = Path(root)
    return sorted(
        p
        for p in root.rglob(pattern)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def hash_tree(root: str | os.PathLike, pattern: str = "*") -> str:
    """SHA-256 of every file of :func:`tree_files` (relative names included)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in tree_files(root, pattern):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hash_files([path]).encode())
    return digest.hexdigest()
