"""The dataset contract (DESIGN.md "Contracts"): readers, validation and the skipped-rows report."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vlmlayers.data import DatasetError, image_of, read_dataset, read_labels, read_table


def png(colour: tuple[int, int, int] = (255, 0, 0), size: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def rows(n: int = 4) -> list[dict]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (9, 9, 9)]
    return [
        {
            "id": f"s{i}",
            "image": png(colours[i % len(colours)]),
            "caption": f"a {['red', 'blue'][i % 2]} square",
            "question": "what colour is the square?",
            "answer": ["red", "blue"][i % 2],
            "labels.colour": ["red", "blue"][i % 2],
            "labels.size": ["small", "big"][(i // 2) % 2],
        }
        for i in range(n)
    ]


def write(tmp_path: Path, records: list[dict], name: str = "data.parquet") -> Path:
    path = tmp_path / name
    pd.DataFrame(records).to_parquet(path)
    return path


def test_valid_parquet_is_read_whole_and_in_order(tmp_path):
    path = write(tmp_path, rows(5))
    data = read_dataset(path)
    assert data.source == str(path)
    assert data.skipped == []
    assert list(data.frame["id"]) == ["s0", "s1", "s2", "s3", "s4"]
    assert list(data.frame["answer"]) == ["red", "blue", "red", "blue", "red"]
    assert image_of(data.frame.iloc[2]).getpixel((0, 0)) == (0, 0, 255)


def test_integer_ids_become_strings(tmp_path):
    records = rows(3)
    for i, record in enumerate(records):
        record["id"] = 10 + i
    data = read_dataset(write(tmp_path, records))
    assert list(data.frame["id"]) == ["10", "11", "12"]


@pytest.mark.parametrize(
    ("row", "change", "reason"),
    [
        (2, {"image": b"not a png"}, r"image cannot be read"),
        (1, {"caption": "   "}, r"empty caption"),
        (3, {"caption": None}, r"empty caption"),
        (0, {"question": ""}, r"empty question"),
        (2, {"answer": None}, r"empty answer"),
    ],
)
def test_bad_row_error_names_file_row_and_id(tmp_path, row, change, reason):
    records = rows(4)
    records[row].update(change)
    path = write(tmp_path, records, "bad.parquet")
    with pytest.raises(DatasetError, match=rf"bad\.parquet: row {row} \(id 's{row}'\): {reason}"):
        read_dataset(path)


def test_missing_image_file_names_file_row_id_and_image(tmp_path):
    (tmp_path / "img").mkdir()
    records = rows(4)
    for record in records:
        image = tmp_path / "img" / f"{record['id']}.png"
        image.write_bytes(record.pop("image"))
        record["image_path"] = str(image)
    records[2]["image_path"] = str(tmp_path / "img" / "gone.png")
    path = write(tmp_path, records, "paths.parquet")
    with pytest.raises(DatasetError) as err:
        read_dataset(path)
    message = str(err.value)
    assert re.search(r"paths\.parquet: row 2 \(id 's2'\): image cannot be read", message), message
    assert "gone.png" in message
    # Paths that exist are read.
    assert list(read_dataset(path, on_bad_rows="skip").frame["id"]) == ["s0", "s1", "s3"]


def test_duplicate_id_names_both_rows(tmp_path):
    records = rows(4)
    records[3]["id"] = "s1"
    path = write(tmp_path, records, "dup.parquet")
    with pytest.raises(DatasetError, match=r"dup\.parquet: row 3 \(id 's1'\): duplicate id.*row 1"):
        read_dataset(path)


def test_missing_required_columns_are_listed(tmp_path):
    records = [{k: v for k, v in r.items() if k not in ("caption", "answer")} for r in rows(2)]
    path = write(tmp_path, records, "cols.parquet")
    with pytest.raises(DatasetError) as err:
        read_dataset(path)
    message = str(err.value)
    assert "cols.parquet" in message
    assert re.search(r"missing column\(s\) \['caption', 'answer'\]", message), message


def test_missing_image_columns_only_matter_when_images_are_needed(tmp_path):
    records = [{k: v for k, v in r.items() if k != "image"} for r in rows(4)]
    path = write(tmp_path, records)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['image or image_path'\]"):
        read_dataset(path)
    assert list(read_dataset(path, needs_image=False).frame["id"]) == ["s0", "s1", "s2", "s3"]


def test_text_only_reading_does_not_decode_images(tmp_path):
    records = rows(3)
    records[1]["image"] = b"garbage"
    data = read_dataset(write(tmp_path, records), needs_image=False)
    assert len(data.frame) == 3 and data.skipped == []


def test_single_class_label_column_is_an_error(tmp_path):
    records = rows(4)
    for record in records:
        record["labels.shape"] = "square"
    path = write(tmp_path, records, "labels.parquet")
    with pytest.raises(
        DatasetError, match=r"labels\.parquet: label column 'labels\.shape'.*single"
    ):
        read_dataset(path)


def test_label_column_left_with_one_class_after_skipping_is_an_error(tmp_path):
    records = rows(4)
    for record in records[1::2]:  # every "blue" row
        record["caption"] = ""
    with pytest.raises(DatasetError, match=r"'labels\.colour' has a single class"):
        read_dataset(write(tmp_path, records), on_bad_rows="skip")


def test_skip_drops_bad_rows_reports_each_and_keeps_order(tmp_path):
    records = rows(6)
    records[1]["image"] = b"\x89PNG broken"
    records[3]["caption"] = ""
    records[4]["id"] = "s0"  # duplicate of a good row
    path = write(tmp_path, records)
    data = read_dataset(path, on_bad_rows="skip")
    assert list(data.frame["id"]) == ["s0", "s2", "s5"]
    assert list(data.frame.index) == [0, 1, 2]
    assert [(s["row"], s["id"]) for s in data.skipped] == [(1, "s1"), (3, "s3"), (4, "s0")]
    reasons = [s["reason"] for s in data.skipped]
    assert reasons[0].startswith("image cannot be read")
    assert reasons[1] == "empty caption"
    assert reasons[2].startswith("duplicate id") and "row 0" in reasons[2]
    # The kept rows are the original ones, untouched.
    assert image_of(data.frame.iloc[2]).getpixel((0, 0)) == (9, 9, 9)


def test_duplicate_of_a_skipped_row_is_kept(tmp_path):
    records = rows(4)
    records[0]["caption"] = ""
    records[2]["id"] = "s0"
    data = read_dataset(write(tmp_path, records), on_bad_rows="skip")
    assert list(data.frame["id"]) == ["s1", "s0", "s3"]
    assert [(s["row"], s["reason"]) for s in data.skipped] == [(0, "empty caption")]


def test_rows_are_positions_in_the_file_not_saved_pandas_labels(tmp_path):
    frame = pd.DataFrame(rows(6))
    frame.loc[4, "image"] = b"bad"
    path = tmp_path / "filtered.parquet"
    frame[frame["id"] != "s1"].to_parquet(path)  # pandas saves the index labels 0, 2, 3, 4, 5
    with pytest.raises(DatasetError, match=r"filtered\.parquet: row 3 \(id 's4'\)"):
        read_dataset(path)
    frame.set_index("id").to_parquet(tmp_path / "indexed.parquet")
    assert list(read_table(tmp_path / "indexed.parquet")["id"])[:2] == ["s0", "s1"]


def test_on_bad_rows_must_be_known(tmp_path):
    with pytest.raises(ValueError, match=r"on_bad_rows must be 'error' or 'skip', not 'drop'"):
        read_dataset(write(tmp_path, rows(2)), on_bad_rows="drop")


def test_jsonl_with_relative_image_paths(tmp_path):
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(png((1, 2, 3)))
    lines = []
    for i, record in enumerate(rows(3)):
        image = record.pop("image")
        if i == 2:
            record["image_path"] = str(absolute)
        else:
            (folder / "images" / f"{i}.png").write_bytes(image)
            record["image_path"] = f"images/{i}.png"
        lines.append(json.dumps(record))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    data = read_dataset(folder / "data.jsonl")
    assert list(data.frame["id"]) == ["s0", "s1", "s2"]
    assert data.frame["image_path"][0] == str(folder / "images" / "0.png")
    assert data.frame["image_path"][2] == str(absolute)
    assert image_of(data.frame.iloc[1]).getpixel((0, 0)) == (0, 255, 0)
    assert image_of(data.frame.iloc[2]).getpixel((0, 0)) == (1, 2, 3)


def test_jsonl_keeps_string_values_as_written(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    record = {"image_path": "a.png", "caption": "2020-01-01", "question": "how many?"}
    lines = [json.dumps({"id": i, "answer": a, **record}) for i, a in (("007", "3"), ("010", "04"))]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    frame = read_dataset(tmp_path / "d.jsonl").frame
    assert list(frame["id"]) == ["007", "010"]
    assert list(frame["answer"]) == ["3", "04"]
    assert list(frame["caption"]) == ["2020-01-01"] * 2


def test_jsonl_bad_row_names_file_and_row(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    lines = [
        {"id": "x", "image_path": "a.png", "caption": "c", "question": "q", "answer": "a"},
        {"id": "y", "image_path": "missing.png", "caption": "c", "question": "q", "answer": "a"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DatasetError, match=r"d\.jsonl: row 1 \(id 'y'\): image cannot be read"):
        read_dataset(path)


def test_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = rows(4)
    records[2]["caption"] = ""
    columns = {key: [r[key] for r in records] for key in records[0]}
    directory = tmp_path / "hf"
    datasets.Dataset.from_dict(columns).save_to_disk(str(directory))
    with pytest.raises(DatasetError, match=r"hf: row 2 \(id 's2'\): empty caption"):
        read_dataset(directory)
    data = read_dataset(directory, on_bad_rows="skip")
    assert list(data.frame["id"]) == ["s0", "s1", "s3"]
    assert image_of(data.frame.iloc[1]).getpixel((0, 0)) == (0, 255, 0)
    labels = read_labels(directory)
    assert labels.loc["s3", "size"] == "big"


def test_save_to_disk_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = rows(3)
    columns = {key: [r[key] for r in records] for key in records[0]}
    columns["image"] = [{"bytes": b, "path": None} for b in columns["image"]]
    features = datasets.Features(
        {key: datasets.Image() if key == "image" else datasets.Value("string") for key in columns}
    )
    directory = tmp_path / "hf_image"
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(directory))
    data = read_dataset(directory)
    assert list(data.frame["id"]) == ["s0", "s1", "s2"]
    assert image_of(data.frame.iloc[2]).getpixel((0, 0)) == (0, 0, 255)


def test_unsupported_format_is_a_clear_error(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("id\tcaption\n1\ta\n")
    with pytest.raises(DatasetError, match=r"data\.tsv: unsupported dataset format"):
        read_dataset(path)
    folder = tmp_path / "plain_dir"
    folder.mkdir()
    with pytest.raises(DatasetError, match=r"plain_dir: unsupported dataset format"):
        read_dataset(folder)


def test_missing_path_is_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "data.parquet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_dataset(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_labels(path)


def test_read_labels_strips_prefix_and_indexes_by_id(tmp_path):
    records = rows(4)
    for record in records:
        record["id"] = int(record["id"][1:]) + 100
    path = write(tmp_path, records)
    labels = read_labels(path)
    assert list(labels.columns) == ["colour", "size"]
    assert list(labels.index) == ["100", "101", "102", "103"]
    assert labels.loc["101", "colour"] == "blue"
    assert labels.loc["102", "size"] == "big"
    assert list(labels["size"]) == ["small", "small", "big", "big"]


def test_read_labels_without_label_columns_is_empty(tmp_path):
    records = [{k: v for k, v in r.items() if not k.startswith("labels.")} for r in rows(2)]
    labels = read_labels(write(tmp_path, records))
    assert labels.shape == (2, 0)
    assert list(labels.index) == ["s0", "s1"]
