"""The dataset contract (DESIGN.md): one row per sample, readers and validation.

Columns: ``id`` (unique str), ``image`` (PNG/JPEG bytes) or ``image_path``, ``caption``,
``question``, ``answer``, optional ``captions`` (paraphrases for the text form),
``labels.<name>`` categorical columns and ``task`` (benchmark sub-task).

Readers: Parquet, CSV and JSONL (a relative ``image_path`` is relative to the file's folder), and
a directory saved by ``datasets.Dataset.save_to_disk``; other layouts (COCO captions, the hub) go
through ``vlmlayers prepare``. Bad rows raise an error naming the file and row, or with
``on_bad_rows="skip"`` are dropped and listed in the returned report; never silently.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

LABEL_PREFIX = "labels."
REQUIRED = ("id", "caption", "question", "answer")


class DatasetError(ValueError):
    """A dataset violates the contract; the message names the file and row or column."""


@dataclass
class Dataset:
    """A validated dataset: the frame and the rows skipped (with reasons)."""

    frame: pd.DataFrame
    source: str
    skipped: list[dict] = field(default_factory=list)


TEXT_COLUMNS = (*REQUIRED, "task", "image_path")  # read as strings: "007" and "3" stay so


def read_table(path: str | os.PathLike, images: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read any supported source into a frame (no validation).

    A relative ``image_path`` is resolved against ``images`` (default: the file's folder).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if path.is_dir() and (path / "dataset_info.json").exists():
        import datasets

        return datasets.load_from_disk(str(path)).to_pandas()
    if path.suffix == ".parquet":
        return _positional(pd.read_parquet(path))
    if path.suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    elif path.suffix == ".csv":
        header = pd.read_csv(path, nrows=0).columns
        text = {c: str for c in header if c in TEXT_COLUMNS or c.startswith(LABEL_PREFIX)}
        frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])
    else:
        raise DatasetError(
            f"{path}: unsupported dataset format (Parquet, CSV, JSONL or a save_to_disk "
            "directory; vlmlayers prepare converts COCO captions and hub datasets)"
        )
    if "image_path" in frame:
        root = Path(images) if images is not None else path.parent
        frame["image_path"] = [
            p if pd.isna(p) or Path(p).is_absolute() else str(root / p) for p in frame["image_path"]
        ]
    return frame


def _positional(frame: pd.DataFrame) -> pd.DataFrame:
    """Row numbers in messages are positions in the file, whatever index pandas saved with it
    (a filtered frame's labels, or ``set_index("id")``, which goes back to being a column)."""
    if frame.index.equals(pd.RangeIndex(len(frame))):
        return frame
    return frame.reset_index(drop=all(name is None for name in frame.index.names))


def image_of(row: pd.Series | dict) -> Image.Image:
    """Decode a row's image (bytes or path) as RGB."""
    data = row.get("image")
    if isinstance(data, dict):  # HF datasets Image feature stored as {"bytes", "path"}
        data = data.get("bytes")
    source = io.BytesIO(data) if data is not None else row.get("image_path")
    if source is None:
        raise DatasetError("row has neither 'image' bytes nor 'image_path'")
    with Image.open(source) as image:
        return image.convert("RGB")


def _problems(row: pd.Series, needs_image: bool) -> str | None:
    for column in ("caption", "question", "answer"):
        value = row.get(column)
        if value is None or (isinstance(value, float) and pd.isna(value)) or not str(value).strip():
            return f"empty {column}"
    if needs_image:
        try:
            image_of(row)
        except (UnidentifiedImageError, OSError, DatasetError) as err:
            return f"image cannot be read ({err})"
    return None


def read_dataset(
    path: str | os.PathLike, on_bad_rows: str = "error", needs_image: bool = True
) -> Dataset:
    """Read and validate ``path`` against the contract."""
    return validate(read_table(path), str(path), on_bad_rows, needs_image)


def validate(
    frame: pd.DataFrame, path: str, on_bad_rows: str = "error", needs_image: bool = True
) -> Dataset:
    """Check ``frame`` (read from ``path``) against the contract: errors name path, row and id."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', not {on_bad_rows!r}")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if needs_image and "image" not in frame and "image_path" not in frame:
        missing.append("image or image_path")
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; has {list(frame.columns)}")
    frame["id"] = frame["id"].astype(str)
    skipped, keep, seen = [], [], {}  # seen: id -> row of the kept row with that id
    for index, row in frame.iterrows():
        if row["id"] in seen:
            problem = f"duplicate id (also row {seen[row['id']]})"
        else:
            problem = _problems(row, needs_image)
        if problem is None:
            seen[row["id"]] = index
        if problem and on_bad_rows == "error":
            raise DatasetError(f"{path}: row {index} (id {row['id']!r}): {problem}")
        if problem:
            skipped.append({"row": int(index), "id": row["id"], "reason": problem})
        keep.append(problem is None)
    for column in label_columns(frame):
        if frame.loc[keep, column].nunique() < 2:
            raise DatasetError(f"{path}: label column {column!r} has a single class")
    return Dataset(frame[keep].reset_index(drop=True), path, skipped)


def label_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(LABEL_PREFIX)]


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """The ``labels.*`` columns of a dataset, indexed by ``id``, prefix stripped."""
    df = read_table(path)
    cols = label_columns(df)
    labels = df.set_index(df["id"].astype(str))[cols]
    labels.columns = [c[len(LABEL_PREFIX) :] for c in cols]
    return labels
