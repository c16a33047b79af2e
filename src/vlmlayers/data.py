"""The dataset contract (DESIGN.md): one row per sample, readers and validation.

Columns: ``id`` (unique str), ``image`` (PNG/JPEG bytes) or ``image_path``, ``caption``,
``question``, ``answer``, optional ``labels.<name>`` categorical columns, optional ``task``.
"""

from __future__ import annotations

import os

import pandas as pd

LABEL_PREFIX = "labels."


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """The ``labels.*`` columns of a dataset Parquet, indexed by ``id``, prefix stripped."""
    df = pd.read_parquet(path)
    cols = [c for c in df.columns if c.startswith(LABEL_PREFIX)]
    labels = df.set_index("id")[cols]
    labels.columns = [c[len(LABEL_PREFIX) :] for c in cols]
    return labels
