"""Validate a workflow config against workflow/schemas/config.schema.yaml (one place for keys).

Errors name the key path and what was expected; defaults from the schema are filled in.
``vlmlayers check-config FILE`` runs the same check by hand.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jsonschema
import yaml

from vlmlayers.depth import parse_band

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The config breaks the schema; the message names the key."""


def _fill_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = sub["default"]
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _message(error: jsonschema.ValidationError) -> str:
    """The error's message; "exactly one of these keys" (schema `oneOf` of `required`s) in words."""
    alternatives = error.validator_value if error.validator == "oneOf" else None
    if alternatives and all(list(a) == ["required"] for a in alternatives):
        keys = [k for a in alternatives for k in a["required"]]
        found = [k for k in keys if isinstance(error.instance, dict) and k in error.instance]
        return f"give exactly one of {keys}, found {found or 'none'}"
    return error.message


def validate(config: dict, schema_path: str | os.PathLike = SCHEMA, source: str = "config") -> dict:
    """Fill defaults into ``config`` in place and raise :class:`ConfigError` on the first error."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = _fill_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors[:10]:
            path = [str(p) for p in error.absolute_path]
            if error.validator == "additionalProperties" and error.validator_value is False:
                # Name the unknown key itself (probe.nboot), not only its parent (probe).
                allowed = sorted(error.schema.get("properties", {}))
                for extra in sorted(set(error.instance) - set(allowed)):
                    lines.append(f"  {'.'.join([*path, extra])}: unknown key; allowed: {allowed}")
                continue
            lines.append(f"  {'.'.join(path) or '(top level)'}: {_message(error)}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines))
    for name, band in config.get("finetune", {}).get("variants", {}).items():
        try:
            parse_band(band)  # LO < HI within [0, 1]: more than the schema's pattern can say
        except ValueError as err:
            raise ConfigError(
                f"{source}: invalid configuration\n  finetune.variants.{name}: {err}"
            ) from None
    return config


def training_flags(section: dict, schema_path: str | os.PathLike = SCHEMA) -> str:
    """``vlmlayers train`` flags for one training section of the world config: every key of
    the schema's ``$defs.training`` that the section sets, in the schema's order, but
    ``checkpoint_every`` (the workflow passes the section's or ``world.checkpoint_every``)."""
    keys = yaml.safe_load(Path(schema_path).read_text())["$defs"]["training"]["properties"]
    return " ".join(
        f"--{key.replace('_', '-')} {section[key]}"
        for key in keys
        if key != "checkpoint_every" and section.get(key) is not None
    )


def load(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        return validate(yaml.safe_load(fh) or {}, source=str(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configfile", type=Path, help="YAML config to check")


def run(args: argparse.Namespace) -> None:
    config = load(args.configfile)
    print(f"{args.configfile}: valid ({len(config.get('models', {}))} extra models)")
