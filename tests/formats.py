"""The tiny world's rows written out in each layout `vlmlayers prepare` reads (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd

# contract column -> the name the HF export gives it, so the adapter's --rename is exercised
HF_RENAME = {"caption": "text", "answer": "label_text"}


def write_images(frame: pd.DataFrame, folder: Path) -> list[str]:
    """Each row's image bytes as folder/<id>.png; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for row in frame.itertuples():
        (folder / f"{row.id}.png").write_bytes(row.image)
        names.append(f"{row.id}.png")
    return names


def export_formats(frame: pd.DataFrame, root: Path) -> dict[str, dict]:
    """Write ``frame`` as CSV + images, COCO captions + questions, and an HF dataset with other
    column names; return one `source` config entry per format."""
    root.mkdir(parents=True, exist_ok=True)
    labels = [c for c in frame.columns if c.startswith("labels.")]

    csv = frame.drop(columns=["image", "captions"]).assign(
        image_path=[f"images/{name}" for name in write_images(frame, root / "csv" / "images")]
    )
    csv.to_csv(root / "csv" / "data.csv", index=False)

    files = write_images(frame, root / "coco" / "images")
    coco = {
        "images": [{"id": i, "file_name": name} for i, name in enumerate(files)],
        "annotations": [
            {"image_id": i, "id": 10 * i + j, "caption": caption}
            for i, captions in enumerate(frame["captions"])
            for j, caption in enumerate(captions)
        ],
    }
    (root / "coco" / "captions.json").write_text(json.dumps(coco))
    questions = [
        {
            "image_id": i,
            "question_id": row["id"],
            "question": row["question"],
            "answer": row["answer"],
            "task": row["task"],
            "labels": {c.removeprefix("labels."): row[c] for c in labels},
        }
        for i, row in frame.reset_index(drop=True).iterrows()
    ]
    (root / "coco" / "questions.json").write_text(json.dumps(questions))

    hf = frame.rename(columns=HF_RENAME)
    datasets.Dataset.from_pandas(hf, preserve_index=False).save_to_disk(str(root / "hf"))
    return {
        "csv": {"format": "table", "path": str(root / "csv" / "data.csv")},
        "coco": {
            "format": "coco",
            "path": str(root / "coco" / "captions.json"),
            "images": str(root / "coco" / "images"),
            "questions": str(root / "coco" / "questions.json"),
        },
        "hf": {"format": "hf", "path": str(root / "hf"), "rename": HF_RENAME},
    }
