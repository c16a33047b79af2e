"""Load any supported VLM or LLM from a model spec, with ONE table of module paths per family.

Every stage that touches a model's internals (extraction, interventions, selective fine-tuning)
goes through :data:`ARCHITECTURES` and :class:`LoadedModel`, never through family-specific code.
Loading uses the Auto classes, safetensors only, and ``trust_remote_code`` only if the spec says so.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

ROLES = ("base", "aligned", "tuned", "variant")


@dataclass(frozen=True)
class ModulePaths:
    """Dotted paths to the parts the analyses need: from the top-level model, except
    :attr:`BLOCK_RELATIVE` ones, which are relative to one decoder block (``layers[i]``)."""

    layers: str
    embeddings: str
    final_norm: str
    lm_head: str = "lm_head"
    projector: str | None = None
    vision_tower: str | None = None
    # Inside a decoder block: the MLP (its output is taken before the residual add) and the
    # attention output projection (its input is the heads' outputs, concatenated head by head).
    mlp: str = "mlp"
    attention_out: str = "self_attn.o_proj"

    BLOCK_RELATIVE: ClassVar[tuple[str, ...]] = ("mlp", "attention_out")


_LLAVA_LIKE = ModulePaths(
    layers="model.language_model.layers",
    embeddings="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    projector="model.multi_modal_projector",
    vision_tower="model.vision_tower",
)

# model_type (config.model_type) -> where things live, for the pinned transformers (5.x).
ARCHITECTURES: dict[str, ModulePaths] = {
    "llama": ModulePaths(
        layers="model.layers", embeddings="model.embed_tokens", final_norm="model.norm"
    ),
    "llava": _LLAVA_LIKE,
    "llava_next": _LLAVA_LIKE,
    "llava_onevision": _LLAVA_LIKE,
    "paligemma": _LLAVA_LIKE,
    "gemma3": _LLAVA_LIKE,
    "idefics3": ModulePaths(
        layers="model.text_model.layers",
        embeddings="model.text_model.embed_tokens",
        final_norm="model.text_model.norm",
        projector="model.connector",
        vision_tower="model.vision_model",
    ),
    "qwen2_vl": ModulePaths(
        layers="model.language_model.layers",
        embeddings="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        projector="model.visual.merger",
        vision_tower="model.visual",
    ),
}

_IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")


@dataclass(frozen=True)
class ModelSpec:
    """A model as the config names it (DESIGN.md "Model spec")."""

    name: str
    path: str
    role: str = "tuned"
    family: str | None = None  # checked against config.model_type when given
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"model {self.name!r}: role {self.role!r} is not one of {ROLES}")

    @classmethod
    def from_config(cls, name: str, entry: dict) -> ModelSpec:
        return cls(name=name, **entry)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, name: str, role: str = "tuned", prefix: str = ""
    ) -> ModelSpec:
        """The spec that :func:`add_spec_arguments` (same ``prefix``) put on the command line."""
        key = prefix.replace("-", "_")
        return cls(
            name=name,
            path=getattr(args, f"{key}path"),
            role=role,
            family=getattr(args, f"{key}family"),
            revision=getattr(args, f"{key}revision"),
            dtype=args.dtype,
            trust_remote_code=getattr(args, f"{key}trust_remote_code"),
        )


def add_spec_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """A model spec's flags (``--path`` ...; ``prefix`` "donor-" gives ``--donor-path`` ...)."""
    parser.add_argument(
        f"--{prefix}path", required=not prefix, help="checkpoint directory or hub id"
    )
    parser.add_argument(f"--{prefix}family", default=None, help="expected model_type (checked)")
    parser.add_argument(f"--{prefix}revision", default=None, help="hub revision to pin")
    parser.add_argument(
        f"--{prefix}trust-remote-code",
        action="store_true",
        help="run the repository's own modelling code (only if you trust it)",
    )


@dataclass
class LoadedModel:
    """A model, its processor (or tokenizer) and resolved module paths."""

    spec: ModelSpec
    model: nn.Module
    processor: object
    paths: ModulePaths
    is_multimodal: bool
    image_token_id: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def module(self, dotted: str) -> nn.Module:
        return self.model.get_submodule(dotted)

    @property
    def layers(self) -> nn.ModuleList:
        return self.module(self.paths.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def projector(self) -> nn.Module | None:
        return self.module(self.paths.projector) if self.paths.projector else None


def paths_for(model_type: str) -> ModulePaths:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise KeyError(
            f"model_type {model_type!r} has no entry in vlmlayers.models.ARCHITECTURES; "
            f"supported: {sorted(ARCHITECTURES)}"
        ) from None


def image_token_id(config) -> int | None:
    for attr in _IMAGE_TOKEN_ATTRS:
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    return None


def check_checkpoint(path: str | os.PathLike) -> None:
    """A local checkpoint must exist and hold safetensors weights (no pickle loading)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{path} has no *.safetensors weights; vlmlayers loads safetensors only "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )


def load(
    spec: ModelSpec, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load ``spec`` with the Auto classes; image-text models get their processor."""
    from transformers import AutoConfig

    local = Path(spec.path).exists() or spec.path.startswith((".", "/"))
    if local:
        check_checkpoint(spec.path)
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(spec.path, **common)
    except OSError as err:  # e.g. a relative path that does not exist is tried as a hub id
        raise OSError(
            f"model {spec.name!r}: cannot load {spec.path} (neither a local checkpoint nor a "
            f"reachable hub id): {err}"
        ) from err
    if spec.family and spec.family != config.model_type:
        raise ValueError(
            f"model {spec.name!r}: spec family {spec.family!r} but checkpoint model_type is "
            f"{config.model_type!r}"
        )
    paths = paths_for(config.model_type)
    multimodal = paths.vision_tower is not None
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = auto.from_pretrained(spec.path, dtype=dtype or "auto", use_safetensors=True, **common)
    model.to(device).eval()
    processor = (AutoProcessor if multimodal else AutoTokenizer).from_pretrained(
        spec.path, **common
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        spec=spec,
        model=model,
        processor=processor,
        paths=paths,
        is_multimodal=multimodal,
        image_token_id=image_token_id(config) if multimodal else None,
    )
