"""Bring your own data: convert a dataset into the contract's self-contained Parquet.

Sources (``--format``):
  table   a Parquet, CSV or JSONL file, or a ``save_to_disk`` directory, already in the contract
          (``--rename`` maps other column names onto it)
  coco    COCO captions JSON (``images`` + ``annotations``) with an image folder, and a questions
          file: a JSON list of {"image_id", "question", "answer"} (COCO-QA / VQA style; optional
          "question_id", "task" and "labels": {name: value}); one row per question, the image's
          captions as ``caption`` (first) and ``captions`` (all)
  hf      a Hugging Face dataset: a hub id (read with ``datasets.load_dataset``; offline it needs
          the local cache) or a ``save_to_disk`` directory, one ``--split``

Images are embedded as bytes, so the output is self-contained: it can be hashed, cached and
shared. ``--n`` keeps a seeded random subset (in source order). Rows are validated as every stage
validates them (vlmlayers.data): a bad row stops with its file, row and id named, or with
``--on-bad-rows skip`` is dropped and listed. The output is written atomically.

    vlmlayers prepare --format coco --path annotations/captions_val2014.json \\
        --images val2014 --questions coco_qa_val.json --n 2500 --out data/coco.parquet
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from vlmlayers.data import Dataset, DatasetError, read_table, validate
from vlmlayers.io import write_parquet

FORMATS = ("table", "coco", "hf")


def read_coco(path: Path, images: Path, questions: Path) -> pd.DataFrame:
    """One row per question of a COCO captions file (see the module help)."""
    coco = json.loads(Path(path).read_text())
    for key in ("images", "annotations"):
        if key not in coco:
            raise DatasetError(f"{path}: not a COCO captions file (no {key!r} key)")
    files = {entry["id"]: entry["file_name"] for entry in coco["images"]}
    captions: dict[int, list[str]] = defaultdict(list)
    for entry in coco["annotations"]:
        captions[entry["image_id"]].append(str(entry["caption"]).strip())
    entries = json.loads(Path(questions).read_text())
    if isinstance(entries, dict):  # {"questions": [...]}
        entries = entries.get("questions")
    if not isinstance(entries, list):
        raise DatasetError(f"{questions}: expected a list of questions")
    rows = []
    for index, entry in enumerate(entries):
        missing = {"image_id", "question", "answer"} - set(entry)
        if missing:
            raise DatasetError(f"{questions}: entry {index} lacks {sorted(missing)}")
        image_id = entry["image_id"]
        if image_id not in files or not captions.get(image_id):
            what = "image" if image_id not in files else "caption"
            raise DatasetError(f"{questions}: entry {index}: image_id {image_id} has no {what}")
        rows.append(
            {
                "id": str(entry.get("question_id", f"{image_id}-{index}")),
                "image_path": str(Path(images) / files[image_id]),
                "caption": captions[image_id][0],
                "captions": captions[image_id],
                "question": entry["question"],
                "answer": str(entry["answer"]),
                **({"task": entry["task"]} if "task" in entry else {}),
                **{f"labels.{k}": v for k, v in entry.get("labels", {}).items()},
            }
        )
    return pd.DataFrame(rows)


def read_hf(source: str, split: str) -> pd.DataFrame:
    """A split of a hub dataset or of a ``save_to_disk`` directory."""
    import datasets

    if Path(source).is_dir():
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetError(f"{source}: no split {split!r}; has {sorted(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(source, split=split)
    return loaded.to_pandas()


def embed_images(frame: pd.DataFrame) -> pd.DataFrame:
    """``image`` as raw bytes: file contents of ``image_path``, or an HF Image's bytes/path.

    An unreadable file leaves ``image`` empty and its ``image_path`` in place, so validation
    names the row and the file."""
    frame = frame.copy()
    column = "image" if "image" in frame else "image_path" if "image_path" in frame else None
    if column:
        values = tqdm(frame[column], desc="images", unit="img", leave=False)
        frame["image"] = [_image_bytes(value) for value in values]
    return frame


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # datasets' Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and value:
        try:
            return Path(value).read_bytes()
        except OSError:
            return None  # validation names the row: "image cannot be read"
    return value


def prepare(
    fmt: str,
    path: str,
    *,
    images: str | None = None,
    questions: str | None = None,
    split: str = "train",
    rename: dict[str, str] | None = None,
    n: int = 0,
    seed: int = 0,
    on_bad_rows: str = "error",
) -> Dataset:
    """Read ``path`` in format ``fmt`` into a validated contract frame with embedded images."""
    if fmt == "coco":
        if not questions:
            raise DatasetError(f"{path}: COCO captions carry no questions; give --questions")
        frame = read_coco(Path(path), Path(images or Path(path).parent), Path(questions))
    elif fmt == "hf":
        frame = read_hf(path, split)
    elif fmt == "table":
        frame = read_table(path, images)
    else:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    rename = rename or {}
    absent = sorted(set(rename.values()) - set(frame.columns))
    if absent:
        raise DatasetError(f"{path}: --rename names column(s) {absent}; has {list(frame.columns)}")
    frame = frame.rename(columns={source: target for target, source in rename.items()})
    if n and n < len(frame):
        frame = frame.sample(n=n, random_state=seed).sort_index()
    frame = embed_images(frame).reset_index(drop=True)
    dataset = validate(frame, str(path), on_bad_rows, needs_image="image" in frame)
    dataset.frame = dataset.frame.drop(columns=["image_path"], errors="ignore")
    return dataset


def _mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        target, sep, source = pair.partition("=")
        if not sep or not target or not source:
            raise SystemExit(f"--rename expects CONTRACT=SOURCE, got {pair!r}")
        mapping[target] = source
    return mapping


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="source layout")
    parser.add_argument("--path", required=True, help="source file, directory or hub id")
    parser.add_argument("--images", default=None, help="folder of relative image paths")
    parser.add_argument("--questions", default=None, help="coco: the questions JSON")
    parser.add_argument("--split", default="train", help="hf: the split to read")
    parser.add_argument(
        "--rename",
        nargs="*",
        default=[],
        metavar="CONTRACT=SOURCE",
        help="contract column <- source column, e.g. caption=text answer=label",
    )
    parser.add_argument("--n", type=int, default=0, help="keep a random subset of N rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --n subset")
    parser.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    parser.add_argument("--out", type=Path, required=True, help="contract Parquet to write")


def run(args: argparse.Namespace) -> None:
    dataset = prepare(
        args.format,
        args.path,
        images=args.images,
        questions=args.questions,
        split=args.split,
        rename=_mapping(args.rename),
        n=args.n,
        seed=args.seed,
        on_bad_rows=args.on_bad_rows,
    )
    for skipped in dataset.skipped:
        print(f"skipped row {skipped['row']} (id {skipped['id']!r}): {skipped['reason']}")
    write_parquet(dataset.frame, args.out)
    print(f"{len(dataset.frame)} rows -> {args.out} ({len(dataset.skipped)} skipped)")
