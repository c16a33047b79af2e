"""`vlmlayers prepare`: each source layout gives the same contract rows; bad sources are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from formats import export_formats

from vlmlayers.cli import main
from vlmlayers.data import DatasetError, read_dataset
from vlmlayers.prepare import prepare

CONTRACT = ["id", "caption", "question", "answer", "task"]


@pytest.fixture(scope="module")
def rows(tiny_world):
    return pd.read_parquet(tiny_world / "analysis.parquet").head(16)


@pytest.fixture(scope="module")
def sources(rows, tmp_path_factory):
    return export_formats(rows, tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("fmt", ["csv", "coco", "hf"])
def test_every_layout_gives_the_same_rows(rows, sources, fmt, tmp_path):
    source = dict(sources[fmt])
    out = tmp_path / "data.parquet"
    rename = [f"{k}={v}" for k, v in source.pop("rename", {}).items()]
    flags = [f"--{key}={value}" for key, value in source.items()]
    main(["prepare", *flags, *(["--rename", *rename] if rename else []), "--out", str(out)])
    got = read_dataset(out).frame  # the stages' own reader accepts it
    pd.testing.assert_frame_equal(got[CONTRACT], rows[CONTRACT].reset_index(drop=True))
    labels = [c for c in rows.columns if c.startswith("labels.")]
    assert (got[labels].to_numpy() == rows[labels].to_numpy()).all()
    assert list(got["image"]) == list(rows["image"])  # the very bytes, embedded
    assert "image_path" not in got
    if fmt != "csv":  # a CSV cannot hold the caption list; the others keep every paraphrase
        assert [list(c) for c in got["captions"]] == [list(c) for c in rows["captions"]]


def test_subset_is_seeded_and_keeps_source_order(sources):
    first = prepare("table", sources["csv"]["path"], n=5, seed=3).frame
    again = prepare("table", sources["csv"]["path"], n=5, seed=3).frame
    other = prepare("table", sources["csv"]["path"], n=5, seed=4).frame
    assert list(first["id"]) == list(again["id"]) == sorted(first["id"])
    assert list(first["id"]) != list(other["id"])


def test_coco_without_questions_or_with_a_bad_entry_is_named(sources, tmp_path):
    coco = sources["coco"]
    with pytest.raises(DatasetError, match="give --questions"):
        prepare("coco", coco["path"], images=coco["images"])
    entries = json.loads(Path(coco["questions"]).read_text())
    del entries[2]["answer"]
    entries[5]["image_id"] = 999
    bad = tmp_path / "questions.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match=r"entry 2 lacks \['answer'\]"):
        prepare("coco", coco["path"], images=coco["images"], questions=str(bad))
    entries[2]["answer"] = "red"
    bad.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match="entry 5: image_id 999 has no image"):
        prepare("coco", coco["path"], images=coco["images"], questions=str(bad))


def test_missing_image_is_named_or_skipped(sources, rows):
    csv = sources["csv"]["path"]
    table = pd.read_csv(csv, dtype=str)
    table.loc[3, "image_path"] = "images/nowhere.png"
    table.to_csv(csv.replace("data.csv", "broken.csv"), index=False)
    broken = csv.replace("data.csv", "broken.csv")
    with pytest.raises(DatasetError, match=rf"row 3 \(id '{rows['id'].iloc[3]}'\): image cannot"):
        prepare("table", broken)
    kept = prepare("table", broken, on_bad_rows="skip")
    assert len(kept.frame) == len(rows) - 1
    assert [s["row"] for s in kept.skipped] == [3]


def test_rename_of_an_absent_column_names_it(sources):
    with pytest.raises(DatasetError, match=r"--rename names column\(s\) \['nope'\]"):
        prepare("hf", sources["hf"]["path"], rename={"caption": "nope"})


def test_csv_keeps_text_as_text(tmp_path, rows):
    frame = rows.drop(columns=["image", "captions"]).assign(id=[f"{i:03d}" for i in range(16)])
    frame["answer"] = "3"
    frame.to_csv(tmp_path / "t.csv", index=False)
    got = prepare("table", str(tmp_path / "t.csv")).frame
    assert got["id"].iloc[0] == "000" and (got["answer"] == "3").all()
    assert got["heldout_pair"].dtype == np.bool_  # other columns keep their inferred types
