"""Compose a VLM checkpoint from parts: an architecture, a base LM's weights and a projector file.

LLaVA-1.5's stage-1 ("aligned") model is released as a projector only (``mm_projector.bin``):
the VLM is the tuned model's architecture with the base LM's weights and that projector
(DESIGN.md, "What the study's own code did"). This stage builds it as a self-contained Hugging
Face checkpoint that every other stage loads like any other:

- ``--architecture``: the tuned model (directory or hub id): config, processor and the vision
  tower's weights (frozen in both stages, so the same in the aligned model);
- ``--language-model``: the base LM: its language model (decoder blocks, embeddings, final
  norm) and ``lm_head`` replace the architecture's, with strict key matching. When its
  vocabulary is smaller (LLaVA adds an image token and pads the vocabulary), its rows are copied
  and the architecture's extra rows are kept (``compose.json`` lists them); the two tokenizers
  must agree on the copied ids (``--allow-tokenizer-mismatch`` records disagreement instead);
- ``--projector``: a state dict file (safetensors, or a torch pickle read with
  ``weights_only=True``). ``--projector-map auto`` takes the projector's own names (under any
  prefix) or LLaVA's original layout, its numbered layers in order onto the projector's layers
  (``model.mm_projector.0`` / ``.2`` -> ``linear_1`` / ``linear_2``); a JSON object
  ``{"file prefix": "projector submodule"}`` gives the mapping explicitly.

Where the parts live comes from ``vlmlayers.models.ARCHITECTURES`` only (the language model is
the parent of the ``layers`` / ``embeddings`` / ``final_norm`` paths). Anything else the
architecture has outside the vision tower stays the architecture's and is listed in the manifest
(``kept_from_architecture``). The output directory holds ``save_pretrained`` safetensors, the
processor and ``compose.json`` (the three sources with their sha256, the mapping, the vocabulary
rows); it is written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from vlmlayers import __version__
from vlmlayers.io import atomic_path, hash_files, tree_files
from vlmlayers.models import ModulePaths, paths_for
from vlmlayers.runtime import setup_torch

MANIFEST = "compose.json"
# Files of a checkpoint directory that compose never reads (pickled weights), left out of its hash.
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a hub checkpoint needs (no pickled weights are downloaded).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class ComposeError(ValueError):
    """The parts do not fit together; the message names the key and the file or checkpoint."""


# ---------------------------------------------------------------------------------------------
# sources


def resolve_checkpoint(source: str, revision: str | None = None) -> Path:
    """A local directory as is; a hub id as its snapshot in the Hugging Face cache (downloaded
    when online, without pickled weights)."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists() or source.startswith((".", "/")):
        raise FileNotFoundError(f"checkpoint {source} is not a directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, revision=revision, allow_patterns=_HUB_PATTERNS))


def checkpoint_files(root: Path) -> list[Path]:
    """The files compose may read from a checkpoint directory (hidden files and pickles out)."""
    return [p for p in tree_files(root) if p.suffix not in _PICKLES]


def describe_checkpoint(source: str, revision: str | None, root: Path) -> dict:
    """Source entry of the manifest: per-file sha256 and one over (name, file hash) in order."""
    files = {
        name: hash_files([root / name])
        for name in sorted(str(p.relative_to(root)) for p in checkpoint_files(root))
    }
    listing = "".join(f"{digest}  {name}\n" for name, digest in files.items())
    return {
        "path": source,
        "revision": revision,
        "resolved": str(root),
        "sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "sha256_of": "the sha256sum-style listing of `files` (hash, two spaces, name; sorted)",
        "files": files,
    }


def load_model(root: Path, dtype: torch.dtype | str) -> tuple[nn.Module, ModulePaths]:
    """Any supported checkpoint through the Auto classes (safetensors only) + its module paths."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(root)
    paths = paths_for(config.model_type)
    auto = AutoModelForImageTextToText if paths.vision_tower else AutoModelForCausalLM
    model = auto.from_pretrained(root, dtype=dtype, use_safetensors=True)
    return model.eval(), paths


def read_projector(path: Path) -> dict[str, torch.Tensor]:
    """A projector state dict: safetensors, or a torch pickle read with ``weights_only=True``."""
    if not path.is_file():
        raise FileNotFoundError(f"projector file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the unpickler raises many error types
            raise ComposeError(
                f"projector file {path}: not a safetensors file nor a plain torch state dict "
                f"(read with weights_only=True): {err}"
            ) from err
    if not isinstance(state, dict) or not state:
        raise ComposeError(f"projector file {path}: expected a non-empty dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ComposeError(f"projector file {path}: key {bad[0]!r} is not a named tensor")
    return state


# ---------------------------------------------------------------------------------------------
# module paths


def language_model_path(paths: ModulePaths) -> str:
    """The language model (decoder without head): the parent of layers, embeddings, final norm."""
    parents = {p.rpartition(".")[0] for p in (paths.layers, paths.embeddings, paths.final_norm)}
    if len(parents) != 1:
        raise ComposeError(
            f"layers, embeddings and final_norm ({paths.layers}, {paths.embeddings}, "
            f"{paths.final_norm}) do not share one parent module: no language model to replace"
        )
    return parents.pop()


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# copying weights


def copy_state(
    target: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    where: str,
    source: str,
    resizable: tuple[str, ...] = (),
    origin: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Copy ``state`` into ``target`` in place with strict key matching.

    ``where`` is ``target``'s path in the model and ``source`` the file or checkpoint, both named
    in errors. Keys in ``resizable`` may have fewer rows than the target (a smaller vocabulary):
    those rows are copied and the rest are kept; returns {key: {rows, copied}} for them.
    ``origin`` gives a renamed key's name in the source, for the errors.
    """
    origin = origin or {}

    def named(key: str) -> str:
        return f"{origin[key]!r} (as {key!r})" if key in origin else repr(key)

    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {[_join(where, k) for k in missing]}")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(named(k) for k in unexpected)}")
        raise ComposeError(f"{source} does not fit {where}: " + "; ".join(parts))
    resized = {}
    for key, value in state.items():
        dest = own[key]
        if dest.shape == value.shape:
            continue
        rows_fit = value.dim() >= 1 and value.shape[1:] == dest.shape[1:]
        if key in resizable and rows_fit and value.shape[0] < dest.shape[0]:
            resized[key] = {"rows": int(dest.shape[0]), "copied": int(value.shape[0])}
            continue
        raise ComposeError(
            f"{source}: key {named(key)} has shape {tuple(value.shape)} but {_join(where, key)} is "
            f"{tuple(dest.shape)}"
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key][: value.shape[0] if key in resized else None].copy_(value)
    return resized


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layers_with_tensors(module: nn.Module) -> list[tuple[str, set[str]]]:
    """(submodule name, its own state-dict entries) in registration order, for those with any."""
    out = []
    for name, sub in module.named_modules():
        own = {n for n, _ in sub.named_parameters(recurse=False)}
        own |= {
            n
            for n, _ in sub.named_buffers(recurse=False)
            if n not in sub._non_persistent_buffers_set
        }
        if own:
            out.append((name, own))
    return out


def _groups(keys: list[str]) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, set()).add(leaf)
    return dict(sorted(groups.items(), key=lambda kv: _natural(kv[0])))


def auto_projector_map(keys: list[str], projector: nn.Module, where: str, file: Path) -> dict:
    """{file prefix: projector submodule}: the projector's own names under a common prefix, or
    (LLaVA's original layout) the file's numbered layers in order onto the projector's layers."""
    expected = set(projector.state_dict())
    first = min(keys)
    for name in expected:  # the projector's own names, under whatever prefix the file uses
        if first == name or first.endswith("." + name):
            prefix = first[: len(first) - len(name)]
            stripped = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
            if len(stripped) == len(keys) and stripped == expected:
                return {_join(prefix.rstrip("."), g): g for g in _groups(sorted(expected))}
    file_groups = _groups(keys)
    layers = _layers_with_tensors(projector)
    mapping = {}
    for (group, leaves), (layer, own) in zip(file_groups.items(), layers, strict=False):
        if leaves != own:
            break
        mapping[group] = layer
    if len(mapping) == len(file_groups) == len(layers):
        return mapping
    unmapped = [k for k in sorted(keys, key=_natural) if k.rpartition(".")[0] not in mapping]
    described = [f"{name or '(itself)'}: {sorted(own)}" for name, own in layers]
    raise ComposeError(
        f"projector file {file}: cannot map key {unmapped[0]!r} (unmapped: {unmapped}) onto "
        f"{where}, whose layers are {described}; "
        'give --projector-map \'{"FILE_PREFIX": "PROJECTOR_SUBMODULE", ...}\''
    )


def apply_projector_map(
    state: dict[str, torch.Tensor], mapping: dict[str, str], file: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename keys by their longest matching file prefix (a key no prefix covers is an error);
    return the renamed state and {new key: file key}."""
    out, origin = {}, {}
    prefixes = sorted(mapping, key=len, reverse=True)
    for key, value in state.items():
        prefix = next((p for p in prefixes if not p or key == p or key.startswith(p + ".")), None)
        if prefix is None:
            raise ComposeError(
                f"projector file {file}: key {key!r} is not covered by the projector map {mapping}"
            )
        new = _join(mapping[prefix], key[len(prefix) :].lstrip("."))
        out[new], origin[new] = value, key
    return out, origin


def parse_projector_map(text: str) -> dict[str, str] | None:
    """``auto`` -> None; otherwise a JSON object of file prefix -> projector submodule."""
    if text == "auto":
        return None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise ComposeError(f"--projector-map: not 'auto' nor a JSON object: {err}") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise ComposeError('--projector-map: expected {"file prefix": "projector submodule"}')
    return mapping


# ---------------------------------------------------------------------------------------------
# tokenizers


def tokenizer_check(arch_root: Path, lm_root: Path, rows: int) -> dict:
    """Do the two tokenizers give the copied rows (ids < ``rows``) the same tokens?"""
    from transformers import AutoTokenizer

    try:
        lm_tok = AutoTokenizer.from_pretrained(lm_root)
        arch_tok = AutoTokenizer.from_pretrained(arch_root)
    except (OSError, ValueError) as err:
        return {"checked": False, "reason": f"a tokenizer did not load: {err}"}
    lm_vocab = {i: t for t, i in lm_tok.get_vocab().items() if i < rows}
    arch_vocab = {i: t for t, i in arch_tok.get_vocab().items() if i < rows}
    differ = sorted(
        i for i in set(lm_vocab) | set(arch_vocab) if lm_vocab.get(i) != arch_vocab.get(i)
    )
    return {
        "checked": True,
        "ids": rows,
        "mismatched_ids": len(differ),
        "examples": [
            {"id": i, "language_model": lm_vocab.get(i), "architecture": arch_vocab.get(i)}
            for i in differ[:5]
        ],
    }


# ---------------------------------------------------------------------------------------------
# compose


def compose(
    architecture: str,
    language_model: str,
    projector: Path,
    out: Path,
    *,
    projector_map: dict[str, str] | None = None,
    dtype: str = "auto",
    architecture_revision: str | None = None,
    language_model_revision: str | None = None,
    allow_tokenizer_mismatch: bool = False,
) -> dict:
    """Write the composed checkpoint to ``out`` (atomically); return its manifest."""
    from transformers import AutoProcessor

    projector = Path(projector)
    state = read_projector(projector)  # fail on a bad file before loading two models
    arch_root = resolve_checkpoint(architecture, architecture_revision)
    lm_root = resolve_checkpoint(language_model, language_model_revision)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)

    model, paths = load_model(arch_root, torch_dtype)
    if not (paths.projector and paths.vision_tower):
        raise ComposeError(
            f"architecture {architecture}: model_type {model.config.model_type!r} has no "
            "projector / vision tower in vlmlayers.models.ARCHITECTURES"
        )
    base, base_paths = load_model(lm_root, model.dtype)  # one dtype: the architecture's
    lm_where, base_lm_where = language_model_path(paths), language_model_path(base_paths)
    base_vocab = base.get_submodule(base_paths.embeddings).weight.shape[0]
    vocab = model.get_submodule(paths.embeddings).weight.shape[0]
    rows = min(base_vocab, vocab)
    tokens = tokenizer_check(arch_root, lm_root, rows)
    if tokens.get("mismatched_ids") and not allow_tokenizer_mismatch:
        first = tokens["examples"][0]
        raise ComposeError(
            f"the tokenizers of {language_model} and {architecture} disagree on "
            f"{tokens['mismatched_ids']} of the {rows} copied embedding rows (id {first['id']}: "
            f"{first['language_model']!r} vs {first['architecture']!r}); the composed model "
            "would read the wrong embeddings (--allow-tokenizer-mismatch to compose anyway)"
        )

    # Language model and head: strict keys; embeddings / head may have fewer rows.
    embed_key = paths.embeddings[len(lm_where) + 1 :] + ".weight"
    base_embed_key = base_paths.embeddings[len(base_lm_where) + 1 :] + ".weight"
    base_lm_state = dict(base.get_submodule(base_lm_where).state_dict())
    base_lm_state[embed_key] = base_lm_state.pop(base_embed_key)
    source = f"language model {language_model}"
    resized = copy_state(
        model.get_submodule(lm_where),
        base_lm_state,
        where=lm_where,
        source=source,
        resizable=(embed_key,),
    )
    resized = {_join(lm_where, k): v for k, v in resized.items()}
    head, base_head = model.get_submodule(paths.lm_head), base.get_submodule(base_paths.lm_head)
    tied = head.weight is model.get_submodule(paths.embeddings).weight
    base_tied = base_head.weight is base.get_submodule(base_paths.embeddings).weight
    if tied != base_tied:
        raise ComposeError(
            f"{source}: its lm_head {'is' if base_tied else 'is not'} tied to its embeddings, "
            f"the architecture's {'is' if tied else 'is not'}"
        )
    if not tied:
        head_state = base_head.state_dict()
        copied = copy_state(
            head, head_state, where=paths.lm_head, source=source, resizable=("weight",)
        )
        resized |= {_join(paths.lm_head, k): v for k, v in copied.items()}
    base_type = base.config.model_type
    del base, base_lm_state

    # Projector: mapped onto the projector module, strict keys and shapes.
    proj = model.get_submodule(paths.projector)
    mapping = projector_map or auto_projector_map(list(state), proj, paths.projector, projector)
    mapped, origin = apply_projector_map(state, mapping, projector)
    copy_state(
        proj, mapped, where=paths.projector, source=f"projector file {projector}", origin=origin
    )

    replaced = (lm_where, paths.lm_head, paths.projector)
    kept = sorted(
        name
        for name in model.state_dict()
        if not any(name == p or name.startswith(p + ".") for p in (*replaced, paths.vision_tower))
    )
    if kept:
        print(f"warning: kept from the architecture (no source replaces them): {kept}")
    manifest = {
        "vlmlayers_version": __version__,
        "model_type": model.config.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "architecture": {
            **describe_checkpoint(architecture, architecture_revision, arch_root),
            "gives": ["config", "processor", paths.vision_tower, *kept],
        },
        "language_model": {
            **describe_checkpoint(language_model, language_model_revision, lm_root),
            "model_type": base_type,
            "gives": [lm_where, paths.lm_head],
            "module": base_lm_where,
        },
        "projector": {
            "path": str(projector),
            "sha256": hash_files([projector]),
            "format": "safetensors" if projector.suffix == ".safetensors" else "torch",
            "gives": [paths.projector],
        },
        "projector_map": {"mode": "explicit" if projector_map else "auto", "prefixes": mapping},
        "kept_from_architecture": kept,
        "vocab": {
            "language_model_rows": int(base_vocab),
            "architecture_rows": int(vocab),
            "copied_rows": int(rows),
            "kept_rows_from_architecture": (
                {"start": int(rows), "stop": int(vocab)} if vocab > rows else None
            ),
            "resized": resized,
            "note": (
                f"embedding and lm_head rows {rows} to {vocab - 1} are the architecture's "
                "(tokens the language model does not have, e.g. the image token and padding)"
                if vocab > rows
                else "same vocabulary size"
            ),
        },
        "tokenizer_check": tokens,
    }
    processor = AutoProcessor.from_pretrained(arch_root)
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--architecture",
        required=True,
        help="tuned model (dir or hub id): config, processor, vision",
    )
    parser.add_argument("--architecture-revision", default=None, help="hub revision to pin")
    parser.add_argument(
        "--language-model", required=True, help="base LM (dir or hub id): language model + lm_head"
    )
    parser.add_argument("--language-model-revision", default=None, help="hub revision to pin")
    parser.add_argument(
        "--projector", type=Path, required=True, help="projector state dict (.safetensors/.bin)"
    )
    parser.add_argument(
        "--projector-map",
        default="auto",
        help='auto, or JSON {"file prefix": "projector submodule"}, e.g. '
        '\'{"model.mm_projector.0": "linear_1", "model.mm_projector.2": "linear_2"}\'',
    )
    parser.add_argument(
        "--dtype", default="auto", help="weights' dtype: auto = the architecture checkpoint's"
    )
    parser.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="compose even if the tokenizers disagree on the copied rows (recorded)",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")


def run(args: argparse.Namespace) -> None:
    setup_torch()
    manifest = compose(
        args.architecture,
        args.language_model,
        args.projector,
        args.out,
        projector_map=parse_projector_map(args.projector_map),
        dtype=args.dtype,
        architecture_revision=args.architecture_revision,
        language_model_revision=args.language_model_revision,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
    )
    summary = {
        k: manifest[k] for k in ("model_type", "dtype", "projector_map", "kept_from_architecture")
    }
    print(json.dumps({"out": str(args.out), **summary, "vocab": manifest["vocab"]["note"]}))
