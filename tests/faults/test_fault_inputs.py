"""Bad input through the command line a user runs: each error names the file, row or key, and
the output it would have written does not exist afterwards (nothing half-written to mistake
for done)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from vlmlayers import activations
from vlmlayers.cli import main
from vlmlayers.config import ConfigError


def _spoil(rows: pd.DataFrame, how: str) -> pd.DataFrame:
    rows = rows.copy()
    if how == "undecodable image":
        rows.loc[3, "image"] = b"not a png"
    elif how == "empty caption":
        rows.loc[2, "caption"] = "  "
    elif how == "duplicate id":
        rows.loc[4, "id"] = rows.loc[0, "id"]
    elif how == "missing column":
        rows = rows.drop(columns=["question"])
    elif how == "single-class label":
        rows["labels.colour"] = "red"
    return rows


BAD_DATA = {
    "undecodable image": r"row 3 \(id 'analysis-000003'\): image cannot be read",
    "empty caption": r"row 2 \(id 'analysis-000002'\): empty caption",
    "duplicate id": r"row 4 \(id 'analysis-000000'\): duplicate id \(also row 0\)",
    "missing column": r"missing column\(s\) \['question'\]",
    "single-class label": r"label column 'labels\.colour' has a single class",
}


@pytest.mark.parametrize("how", BAD_DATA)
def test_bad_dataset_is_named_and_writes_nothing(tiny_world, tmp_path, how):
    source = tmp_path / "data.parquet"
    _spoil(pd.read_parquet(tiny_world / "analysis.parquet").head(16), how).to_parquet(source)
    out = tmp_path / "prepared.parquet"
    with pytest.raises(ValueError, match=BAD_DATA[how]) as err:
        main(["prepare", "--path", str(source), "--out", str(out)])
    assert str(source) in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


def test_missing_image_file_is_named(tiny_world, tmp_path):
    rows = pd.read_parquet(tiny_world / "analysis.parquet").head(8).drop(columns=["image"])
    rows["image_path"] = "images/lost.png"
    source = tmp_path / "data.csv"
    rows.drop(columns=["captions"]).to_csv(source, index=False)
    with pytest.raises(ValueError, match=r"row 0 \(id 'analysis-000000'\).*images/lost\.png"):
        main(["prepare", "--path", str(source), "--out", str(tmp_path / "out.parquet")])
    assert not (tmp_path / "out.parquet").exists()


BAD_CONFIG = {
    "probe: {nboot: 3}": r"probe\.nboot: unknown key",
    "seed: one": r"seed: 'one' is not of type 'integer'",
    "finetune: {variants: {v: '0.7:0.2'}}": r"finetune\.variants\.v: band '0\.7:0\.2'",
    "finetune: {variants: {v: '0.5:1.2'}}": r"finetune\.variants\.v: band '0\.5:1\.2'",
}


@pytest.mark.parametrize("edit", BAD_CONFIG)
def test_bad_config_names_the_key(tmp_path, edit):
    path = tmp_path / "bad.yaml"
    path.write_text(f"results_dir: r\n{edit}\n")
    with pytest.raises(ConfigError, match=BAD_CONFIG[edit]) as err:
        main(["check-config", str(path)])
    assert str(err.value).startswith(f"{path}: invalid configuration")


def _extract(path, data, out) -> None:
    main(["extract", "--model", "m", "--path", str(path), "--data", str(data)]
         + ["--modality", "image", "--out", str(out)])  # fmt: skip


def test_missing_model_path_is_named(tiny_world, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError, match=str(missing)):
        _extract(missing, tiny_world / "analysis.parquet", tmp_path / "acts")
    assert not (tmp_path / "acts").exists()


def test_checkpoint_without_safetensors_is_refused(tiny_models, tiny_world, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["tuned"], pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle we must never unpickle")
    with pytest.raises(FileNotFoundError, match=f"{pickled}.*safetensors"):
        _extract(pickled, tiny_world / "analysis.parquet", tmp_path / "acts")
    assert not (tmp_path / "acts").exists()


def test_nan_or_inf_activations_are_refused_naming_layer_and_sample(tmp_path):
    vectors = np.array([[0.0, 1.0], [1.0, 2.0], [np.inf, 0.0]], dtype=np.float32)
    activations.write_shard(tmp_path, "residual", 4, 0, ["a", "b", "c"], {"last": vectors})
    with pytest.raises(ValueError, match=r"layer 4 pooling 'last'.*1 samples, first id 'c'"):
        activations.load(tmp_path, 4, "last")
