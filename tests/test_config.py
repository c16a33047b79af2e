"""Config validation against workflow/schemas/config.schema.yaml: defaults, key-naming errors."""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import pytest
import yaml

from vlmlayers import config as cfg
from vlmlayers.cli import main
from vlmlayers.config import ConfigError, load
from vlmlayers.world import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
SCHEMA = yaml.safe_load(cfg.SCHEMA.read_text())


def base() -> dict:
    return yaml.safe_load((ROOT / "config" / "test.yaml").read_text())


def write(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_schema_is_the_one_in_the_workflow():
    assert cfg.SCHEMA == ROOT / "workflow" / "schemas" / "config.schema.yaml"
    assert cfg.SCHEMA.exists()


def test_shipped_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert {"config.yaml", "test.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_get_defaults(path):
    config = load(path)
    assert config["results_dir"].startswith("results")
    assert config["seed"] == 0
    # Keys these files leave out get the schema's defaults.
    if config["world"]:
        assert config["datasets"] == {}
        assert config["benchmark"] is None
    else:  # paper.yaml: sources get theirs
        sources = [d["source"] for d in config["datasets"].values()]
        for source in [*sources, config["benchmark"]["source"]]:
            assert source["on_bad_rows"] == "error" and source["rename"] == {}


@pytest.mark.parametrize(
    "overlay", sorted((ROOT / "config" / "overlays").glob("*.yaml")), ids=lambda p: p.name
)
def test_overlays_give_valid_configs(overlay, tmp_path):
    """An overlay (`--configfile config/config.yaml config/overlays/X.yaml`) merged as Snakemake
    merges config files is a valid config; pretrain.yaml switches the shipped models off."""
    from snakemake.utils import update_config

    merged = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(merged, yaml.safe_load(overlay.read_text()))
    config = load(write(tmp_path, merged))
    if overlay.name == "pretrain.yaml":
        assert config["world"]["pretrained"] is None
        assert config["world"]["base_lm"]["layers"] == 12  # the rest of config.yaml kept


@pytest.mark.parametrize("name", ["config.yaml", "test.yaml"])
def test_nested_defaults_are_filled(name):
    raw = yaml.safe_load((ROOT / "config" / name).read_text())
    assert "warmup" not in raw["world"]["vision"]
    config = load(ROOT / "config" / name)
    assert config["world"]["vision"]["warmup"] == 50
    # Values that are given are kept.
    assert config["world"]["stage2"]["warmup"] == raw["world"]["stage2"]["warmup"]
    assert config["probe"]["n_boot"] == raw["probe"]["n_boot"]


def test_test_config_is_smaller_than_the_default():
    full, fast = load(ROOT / "config" / "config.yaml"), load(ROOT / "config" / "test.yaml")
    for key in ("n_train", "n_test", "n_analysis", "n_corpus"):
        assert fast["world"][key] < full["world"][key], key
    assert fast["world"]["pretrained"] is None


def test_minimal_config_gets_every_section_default(tmp_path):
    config = load(write(tmp_path, {"results_dir": "out"}))
    assert config["results_dir"] == "out"
    assert config["seed"] == 0
    assert config["world"] is None
    assert config["models"] == {} and config["datasets"] == {}
    assert config["prompt"] == {"n_captions": 2}
    assert config["extract"] == {
        "batch_size": 16,
        "shard_size": 256,
        "store_dtype": "float32",
        "dtype": "auto",
        "poolings": ["last", "mean_image", "mean_text"],
        "taps": ["residual"],
        "prompt_entropy": True,
    }
    assert config["evaluate"] == {
        "batch_size": 32,
        "max_new_tokens": 5,
        "limit": 0,
        "harness": "lmms-eval",
        "task_prefix": "benchmark",
        "lmms_tasks": [],
        "include_path": [],
        "captioning": True,
    }
    assert config["probe"]["seeds"] == [0, 1, 2]
    assert config["probe"]["test_fraction"] == 0.25
    assert config["geometry"]["baseline_label"] == "question_type"
    assert config["geometry"]["gride_range_max"] == 64


def test_defaults_are_not_shared_between_loads(tmp_path):
    path = write(tmp_path, {"results_dir": "out"})
    first = load(path)
    first["extract"]["poolings"].append("bogus")
    first["prompt"]["n_captions"] = 9
    second = load(path)
    assert second["extract"]["poolings"] == ["last", "mean_image", "mean_text"]
    assert second["prompt"]["n_captions"] == 2


def test_model_and_dataset_entries_get_defaults(tmp_path):
    config = base()
    config["models"] = {"mine": {"path": "hub/id"}, "pinned": {"path": "x", "revision": "abc"}}
    config["datasets"] = {"d": {"path": "d.parquet"}}
    loaded = load(write(tmp_path, config))
    assert loaded["models"]["mine"] == {
        "path": "hub/id",
        "role": "tuned",
        "family": None,
        "revision": None,
        "dtype": "auto",
        "trust_remote_code": False,
    }
    assert loaded["models"]["pinned"]["revision"] == "abc"
    assert loaded["datasets"]["d"] == {"path": "d.parquet", "on_bad_rows": "error"}


def test_validate_fills_in_place():
    config = base()
    assert cfg.validate(config) is config
    assert config["datasets"] == {}


def edit(config: dict, dotted: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


BAD = [
    # Unknown keys, at every depth.
    ("probe.nboot", 10, r"probe\.nboot: unknown key; allowed: \[.*'n_boot'"),
    ("world.stage1.epochs", 3, r"world\.stage1\.epochs: unknown key"),
    ("results", "x", r"^  results: unknown key; allowed: \[.*'results_dir'"),
    ("models.mine", {"path": "p", "trust": True}, r"models\.mine\.trust: unknown key"),
    ("datasets.d", {"path": "p", "bad_rows": "skip"}, r"datasets\.d\.bad_rows: unknown key"),
    # Wrong types.
    ("probe.n_boot", "many", r"probe\.n_boot: 'many' is not of type 'integer'"),
    ("seed", 1.5, r"seed: 1\.5 is not of type 'integer'"),
    ("world.base_lm.lr", "fast", r"world\.base_lm\.lr: 'fast' is not of type 'number'"),
    ("extract.poolings", ["last", "max"], r"extract\.poolings\.1: 'max' is not one of"),
    ("models.mine", {"path": 3}, r"models\.mine\.path: 3 is not of type 'string'"),
    ("world", [1], r"world: \[1\] is not of type 'object', 'null'"),
    # Out of range.
    ("probe.test_fraction", 1.5, r"probe\.test_fraction: 1\.5 is greater than or equal"),
    ("probe.test_fraction", 0, r"probe\.test_fraction: 0 is less than or equal"),
    ("world.n_heldout_pairs", 7, r"world\.n_heldout_pairs: 7 is greater than the maximum"),
    ("world.n_analysis", 1, r"world\.n_analysis: 1 is less than the minimum of 2"),
    ("extract.batch_size", 0, r"extract\.batch_size: 0 is less than the minimum of 1"),
    ("probe.l2", [1e-3, 0.0], r"probe\.l2\.1: 0\.0 is less than or equal"),
    ("extract.store_dtype", "bfloat16", r"extract\.store_dtype: 'bfloat16' is not one of"),
    ("datasets.d", {"path": "p", "on_bad_rows": "drop"}, r"datasets\.d\.on_bad_rows"),
    ("models.mine", {"path": "p", "role": "chat"}, r"models\.mine\.role: 'chat' is not"),
    # Finetune bands: start > end, outside [0, 1], unknown name.
    ("finetune.variants", {"x": "0.6:0.2"}, r"finetune\.variants\.x: band '0\.6:0\.2'.*LO < HI"),
    ("finetune.variants", {"x": "0.5:1.5"}, r"finetune\.variants\.x: band '0\.5:1\.5'"),
    ("finetune.variants", {"x": "centre"}, r"finetune\.variants\.x: 'centre' does not match"),
    # Datasets: a path or a source, not both; a source's format.
    ("datasets.d", {"path": "p", "source": {"format": "hf", "path": "h"}}, r"datasets\.d: .*"),
    ("datasets.d", {"source": {"format": "xml", "path": "p"}}, r"datasets\.d\.source\.format"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_values_name_the_dotted_key(tmp_path, key, value, expected):
    path = write(tmp_path, edit(base(), key, value), "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid configuration\n"), message
    assert re.search(expected, message, re.MULTILINE), message


def test_missing_required_keys_are_named(tmp_path):
    config = base()
    del config["results_dir"]
    del config["world"]["n_test"]
    del config["world"]["stage1"]["lr"]
    config["models"] = {"mine": {"role": "base"}}
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, config))
    message = str(err.value)
    assert "(top level): 'results_dir' is a required property" in message
    assert "world: 'n_test' is a required property" in message
    assert "world.stage1: 'lr' is a required property" in message
    assert "models.mine: give exactly one of ['path', 'compose'], found none" in message


def test_every_error_is_reported_not_only_the_first(tmp_path):
    config = edit(edit(base(), "probe.n_boot", 0), "geometry.k", "ten")
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, config))
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2
    assert lines[0].startswith("  geometry.k: 'ten'")
    assert lines[1].startswith("  probe.n_boot: 0 is less than the minimum")


def test_empty_file_is_missing_results_dir(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"results_dir' is a required property"):
        load(path)


def test_cli_check_config_accepts_a_valid_file(capsys):
    main(["check-config", str(ROOT / "config" / "test.yaml")])
    out = capsys.readouterr().out
    assert "test.yaml: valid" in out


def test_cli_check_config_names_the_bad_key(tmp_path):
    path = write(tmp_path, edit(base(), "geometry.k", 0), "cli.yaml")
    with pytest.raises(ConfigError, match=r"cli\.yaml: invalid configuration\n  geometry\.k: 0"):
        main(["check-config", str(path)])


def test_cli_check_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        main(["check-config", str(tmp_path / "absent.yaml")])


def _properties(schema, where: str = ""):
    """(dotted path, property schema) for every property anywhere in ``schema``."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            yield from _properties(item, f"{where}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{where}.{name}" if where else name
        yield path, sub
        yield from _properties(sub, path)
    for key in ("$defs", "definitions", "patternProperties"):
        for name, sub in (schema.get(key) or {}).items():
            yield from _properties(sub, f"{key}.{name}")
    for key in ("additionalProperties", "items", "anyOf", "oneOf", "allOf", "not", "then", "else"):
        if isinstance(schema.get(key), dict | list):
            yield from _properties(schema[key], f"{where}.<{key}>" if where else f"<{key}>")


def _resolve(sub: dict) -> dict:
    """A property that is only a ``$ref`` is described by its target."""
    ref = sub.get("$ref", "")
    if "description" not in sub and ref.startswith("#/$defs/"):
        return SCHEMA["$defs"][ref.removeprefix("#/$defs/")]
    return sub


def test_schema_walk_sees_nested_and_defs_properties():
    paths = {path for path, _ in _properties(SCHEMA)}
    assert {"results_dir", "world.stage1", "probe.l2", "$defs.training.warmup"} <= paths
    assert "$defs.model.trust_remote_code" in paths
    assert "datasets.<additionalProperties>.on_bad_rows" in paths


def test_every_schema_property_has_a_description():
    undescribed = [
        path
        for path, sub in _properties(SCHEMA)
        if not str(_resolve(sub).get("description", "")).strip()
    ]
    assert undescribed == [], f"schema properties without a description: {undescribed}"


def test_every_schema_ref_resolves():
    refs = [sub["$ref"] for _, sub in _properties(SCHEMA) if "$ref" in sub]
    refs += [SCHEMA["properties"]["models"]["additionalProperties"]["$ref"]]
    for ref in refs:
        assert ref.removeprefix("#/$defs/") in SCHEMA["$defs"], ref


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser


def test_every_training_key_is_a_train_flag():
    # A key the schema allows but `vlmlayers train` lacks would fail every training job.
    flags = _train_parser()._option_string_actions
    keys = SCHEMA["$defs"]["training"]["properties"]
    missing = [k for k in keys if f"--{k.replace('_', '-')}" not in flags]
    assert missing == [], f"training keys with no `vlmlayers train` flag: {missing}"


@pytest.mark.parametrize("section", ["base_lm", "vision", "stage1", "stage2"])
def test_training_flags_pass_every_value_of_the_section(section):
    world = load(ROOT / "config" / "config.yaml")["world"]
    flags = cfg.training_flags(world[section])
    args = _train_parser().parse_args(["base", "--out", "x", *flags.split()])
    passed = {k: v for k, v in world[section].items() if k != "checkpoint_every"}
    assert passed, section
    assert {k: getattr(args, k) for k in passed} == passed
    assert "--checkpoint-every" not in flags  # the rule passes the section's or the world's
