"""Extract per-layer vectors at several tap points into Parquet shards (``vlmlayers.activations``).

One forward pass per batch; hooks on the modules the ``vlmlayers.models`` table names capture:

- ``residual``: layer 0 = the input of block 0 (embeddings, with image features merged in),
  layer l = the raw output of block l, *before* the final norm for the last block (HF's last
  ``hidden_states`` entry has the norm applied; the manifest says which is stored);
- ``mlp_out``: layer l (1..L) = the output of block l's MLP, before the residual add;
- ``heads``: one tap ``head.HH`` per attention head; layer l (1..L) = head h's output through its
  slice of block l's output projection, ``x[..., h*d:(h+1)*d] @ W_o[:, h*d:(h+1)*d].T`` with x
  the projection's input (so the heads sum to its output; a bias, if any, is left out).
  Pooling is linear, so the slice of the pooled input is projected (the same up to rounding,
  without a (batch, tokens, heads, hidden) tensor).

Poolings: ``last`` (last prompt token), ``mean_image`` (mean over image-token positions),
``mean_text`` (mean over the other non-padding positions). With ``--prompt-entropy``, the
matrix-based entropy (``vlmlayers.entropy``) of each prompt's residual token
matrix (its non-padding positions) per layer goes to ``prompt_entropy.parquet`` (id, tap, layer,
entropy). Memory is bounded by the shard size. Resumable: shards go to ``<out>.partial/`` and a
shard whose every tap x layer file (and entropy part) exists is kept across restarts; the
directory is renamed to ``<out>`` only when complete, so a crashed run is never taken as done.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from vlmlayers import __version__, activations, prompts
from vlmlayers.data import read_dataset
from vlmlayers.entropy import token_entropy
from vlmlayers.io import atomic_path, hash_files, hash_tree, write_json
from vlmlayers.models import LoadedModel, ModelSpec, add_spec_arguments, load
from vlmlayers.runtime import resolve_dtype, setup_torch

POOLINGS = ("last", "mean_image", "mean_text")
TAPS = ("residual", "mlp_out", "heads")  # what --taps accepts; "heads" stores head.00, head.01 ...
PROMPT_ENTROPY = "prompt_entropy.parquet"
_ENTROPY_PARTS = "prompt_entropy"  # per-shard parts inside <out>.partial/, combined at the end

TAP_CONVENTION = {
    "residual": "0 = input of decoder block 0; l = output of block l; the last layer is stored "
    "BEFORE the final norm",
    "mlp_out": "l = output of block l's MLP module (1..L), before the residual add (and before "
    "any post-feedforward norm, e.g. gemma3's)",
    "heads": "head.HH, l = head HH's output through its slice of block l's attention output "
    "projection (1..L): x[..., h*d:(h+1)*d] @ W_o[:, h*d:(h+1)*d].T, x = the projection's input; "
    "summed over heads it is the projection's output (before any post-attention norm)",
}


def head_tap(head: int) -> str:
    """The store's tap name of one attention head: ``head.03``."""
    return f"head.{head:02d}"


def head_shape(loaded: LoadedModel) -> tuple[int, int]:
    """(number of heads, head_dim) of the language model: ``head_dim`` from the text config when
    it has one (gemma3's is not hidden / heads), checked against the output projection."""
    text = loaded.model.config.get_text_config()
    n_heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // n_heads)
    out = loaded.layers[0].get_submodule(loaded.paths.attention_out)
    if out.in_features != n_heads * head_dim:
        raise ValueError(
            f"{loaded.paths.attention_out} takes {out.in_features} inputs, not num_attention_heads "
            f"x head_dim = {n_heads} x {head_dim}: cannot split it into heads"
        )
    return n_heads, head_dim


def tap_layers(taps: list[str], n_layers: int, n_heads: int = 0) -> dict[str, list[int]]:
    """Stored tap -> its layers, in canonical order (residual, mlp_out, head.00, head.01, ...)."""
    unknown = set(taps) - set(TAPS)
    if unknown:
        raise ValueError(f"unknown taps {sorted(unknown)}; choose from {TAPS}")
    blocks = list(range(1, n_layers + 1))
    out: dict[str, list[int]] = {}
    if "residual" in taps:
        out["residual"] = list(range(n_layers + 1))
    if "mlp_out" in taps:
        out["mlp_out"] = blocks
    if "heads" in taps:
        out |= {head_tap(h): blocks for h in range(n_heads)}
    return out


@contextlib.contextmanager
def capture_residuals(loaded: LoadedModel) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, ``captured[l]`` holds the residual stream entering layer l+1 (l >= 0)
    after each forward: 0 = input of block 0, l = output of block l. Hooks are always removed."""
    captured: dict[int, torch.Tensor] = {}
    layers = loaded.layers

    def before_first(module, args, kwargs):
        captured[0] = (args[0] if args else kwargs["hidden_states"]).detach()

    def after(index):
        def hook(module, args, output):
            captured[index] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [layer.register_forward_hook(after(i + 1)) for i, layer in enumerate(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_taps(loaded: LoadedModel, taps: list[str]) -> Iterator[dict[str, dict]]:
    """Within the block, after each forward: ``captured["residual"][l]`` as
    :func:`capture_residuals`, ``captured["mlp_out"][l]`` the output of block l's MLP and
    ``captured["attention_in"][l]`` the input of block l's attention output projection (the heads'
    outputs side by side), l = 1..L, each (B, T, width). Only what ``taps`` needs is hooked;
    hooks are always removed."""
    captured: dict[str, dict] = {"residual": {}, "mlp_out": {}, "attention_in": {}}

    def output_of(store: dict, index: int):
        def hook(module, args, output):
            store[index] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def input_of(store: dict, index: int):
        def hook(module, args, kwargs):
            store[index] = (args[0] if args else kwargs["input"]).detach()

        return hook

    handles = []
    with contextlib.ExitStack() as stack:
        if "residual" in taps:
            captured["residual"] = stack.enter_context(capture_residuals(loaded))
        try:
            for index, block in enumerate(loaded.layers, start=1):
                if "mlp_out" in taps:
                    mlp = block.get_submodule(loaded.paths.mlp)
                    handles.append(mlp.register_forward_hook(output_of(captured["mlp_out"], index)))
                if "heads" in taps:
                    out = block.get_submodule(loaded.paths.attention_out)
                    handles.append(
                        out.register_forward_pre_hook(
                            input_of(captured["attention_in"], index), with_kwargs=True
                        )
                    )
            yield captured
        finally:
            for handle in handles:
                handle.remove()


def _masks(
    input_ids: torch.Tensor, attention: torch.Tensor, image_token_id: int | None
) -> dict[str, torch.Tensor]:
    is_image = (
        (input_ids == image_token_id)
        if image_token_id is not None
        else torch.zeros_like(input_ids, dtype=torch.bool)
    )
    real = attention.bool()
    return {"mean_image": is_image & real, "mean_text": ~is_image & real}


def _pool(hidden: torch.Tensor, masks: dict, poolings: list[str]) -> dict[str, torch.Tensor]:
    hidden = hidden.float()
    out = {}
    for name in poolings:
        if name == "last":
            out[name] = hidden[:, -1]
        else:
            mask = masks[name].unsqueeze(-1).to(hidden.dtype)
            out[name] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return out


def head_outputs(pooled_input: torch.Tensor, weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, H*d) inputs of an output projection with ``weight`` (D, H*d) -> (B, H, D): head h's
    slice of the input through its slice of the weight."""
    b, width = pooled_input.shape
    head_dim = width // n_heads
    x = pooled_input.float().view(b, n_heads, head_dim)
    w = weight.float().view(weight.shape[0], n_heads, head_dim)
    return torch.einsum("bhd,ohd->bho", x, w)


def pooled_taps(
    loaded: LoadedModel,
    captured: dict[str, dict],
    layers: dict[str, list[int]],
    masks: dict[str, torch.Tensor],
    poolings: list[str],
    n_heads: int,
) -> Iterator[tuple[str, int, dict[str, torch.Tensor]]]:
    """(tap, layer, pooling -> (B, D) vectors) for every stored tap x layer of one batch."""
    for tap in ("residual", "mlp_out"):
        for layer in layers.get(tap, []):
            yield tap, layer, _pool(captured[tap][layer], masks, poolings)
    if n_heads and head_tap(0) in layers:
        for layer in layers[head_tap(0)]:
            weight = loaded.layers[layer - 1].get_submodule(loaded.paths.attention_out).weight
            pooled = _pool(captured["attention_in"][layer], masks, poolings)
            per_head = {p: head_outputs(v, weight, n_heads) for p, v in pooled.items()}
            for head in range(n_heads):
                yield head_tap(head), layer, {p: v[:, head] for p, v in per_head.items()}


def prompt_entropies(
    residual: dict[int, torch.Tensor], layers: list[int], attention: torch.Tensor
) -> np.ndarray:
    """(B, L) matrix-based entropy of each prompt's token matrix (non-padding positions) at each
    residual layer, by :func:`vlmlayers.entropy.token_entropy` (float64, on the tensors' device;
    every token counts, repeated ones included)."""
    real = attention.bool()
    out = np.empty((attention.shape[0], len(layers)))
    for i in range(attention.shape[0]):
        tokens = torch.stack([residual[layer][i, real[i]] for layer in layers])
        out[i] = token_entropy(tokens).cpu().numpy()
    return out


def pool(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    image_token_id: int | None,
    poolings: list[str],
) -> dict[str, np.ndarray]:
    """Pool a (B, T, D) layer output per sample (left padding: last position is the last token)."""
    pooled = _pool(hidden, _masks(input_ids, attention, image_token_id), poolings)
    return {k: v.cpu().numpy() for k, v in pooled.items()}


def poolings_for(requested: list[str], modality: str, loaded: LoadedModel) -> list[str]:
    """``mean_image`` exists only for image-form inputs of a VLM."""
    has_image = modality == "image" and loaded.is_multimodal
    return [p for p in requested if p != "mean_image" or has_image]


def extraction_manifest(
    loaded: LoadedModel, spec_path: str, data_path: Path, args, poolings: list[str], n: int
) -> dict:
    weights = sorted(Path(spec_path).glob("*.safetensors")) if Path(spec_path).is_dir() else []
    example = prompts.render(
        loaded.processor,
        prompts.conversation(
            {"question": "{question}", "caption": "{caption}", "captions": ["{caption}"]},
            args.modality,
            1,
        ),
    )
    requested = [t for t in TAPS if t in args.taps]
    n_heads, head_dim = head_shape(loaded) if "heads" in requested else (None, None)
    layers = tap_layers(requested, loaded.n_layers, n_heads or 0)
    out_proj = loaded.layers[0].get_submodule(loaded.paths.attention_out)
    return {
        "model": args.model,
        "model_path": str(spec_path),
        "revision": args.revision,
        "weights_sha256": hash_files(weights) if weights else None,
        "model_type": loaded.model.config.model_type,
        "dataset": str(data_path),
        "dataset_sha256": hash_tree(data_path) if data_path.is_dir() else hash_files([data_path]),
        "modality": args.modality,
        "prompt_template": example,
        "n_captions": args.n_captions,
        "model_dtype": str(loaded.model.dtype),
        "store_dtype": args.store_dtype,
        "tap_points": requested,
        "taps": list(layers),
        "layers": layers,
        "n_layers": loaded.n_layers,
        "layer_convention": TAP_CONVENTION["residual"],
        "tap_conventions": {t: TAP_CONVENTION[t] for t in requested},
        "module_paths": {
            "layers": loaded.paths.layers,
            "mlp": loaded.paths.mlp,
            "attention_out": loaded.paths.attention_out,
        },
        "n_heads": n_heads,
        "head_dim": head_dim,
        "heads_bias": (
            "the attention output projection's bias is EXCLUDED from the per-head outputs"
            if "heads" in requested and out_proj.bias is not None
            else None
        ),
        "poolings": poolings,
        "prompt_entropy": PROMPT_ENTROPY if args.prompt_entropy else None,
        "n": n,
        "shard_size": args.shard_size,
        "vlmlayers_version": __version__,
    }


def _params_key(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "vlmlayers_version"}


def _entropy_part(root: Path, part: int) -> Path:
    return root / _ENTROPY_PARTS / f"part-{part:04d}.parquet"


def _write_entropy_part(path: Path, ids: list[str], layers: list[int], values: np.ndarray) -> None:
    """One shard's prompt entropies: a row per sample x residual layer."""
    table = pa.table(
        {
            "id": pa.array(np.repeat(np.asarray(ids, dtype=object), len(layers)), pa.string()),
            "tap": pa.array(["residual"] * values.size, pa.string()),
            "layer": pa.array(np.tile(np.asarray(layers, dtype=np.int64), len(ids))),
            "entropy": pa.array(values.reshape(-1), pa.float64()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _combine_entropy(partial: Path, n_shards: int) -> None:
    """Concatenate the shards' parts into ``prompt_entropy.parquet``, then drop the parts."""
    table = pa.concat_tables(pq.read_table(_entropy_part(partial, k)) for k in range(n_shards))
    with atomic_path(partial / PROMPT_ENTROPY) as tmp:
        pq.write_table(table, tmp)
    shutil.rmtree(partial / _ENTROPY_PARTS)


def _shard_done(partial: Path, layers: dict[str, list[int]], entropy: bool, part: int) -> bool:
    """A shard is done when every tap x layer file of it (and its entropy part) exists."""
    stored = all(
        activations.shard_path(partial, tap, layer, part).exists()
        for tap, tap_layers_ in layers.items()
        for layer in tap_layers_
    )
    combined = (partial / PROMPT_ENTROPY).exists()
    return stored and (not entropy or combined or _entropy_part(partial, part).exists())


def extract(
    loaded: LoadedModel,
    data: pd.DataFrame,
    out: Path,
    manifest: dict,
    batch_size: int,
    shard_size: int,
    n_captions: int,
) -> None:
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        try:
            stale = _params_key(activations.read_manifest(partial)) != _params_key(manifest)
        except (FileNotFoundError, ValueError):
            stale = True
        if stale:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(manifest, partial / activations.MANIFEST)
    layers: dict[str, list[int]] = manifest["layers"]
    entropy = manifest["prompt_entropy"] is not None
    n_heads = manifest["n_heads"] or 0
    n_shards = -(-len(data) // shard_size)
    done = [_shard_done(partial, layers, entropy, k) for k in range(n_shards)]
    if any(done):
        print(f"resuming {partial}: {sum(done)}/{n_shards} shards already written")
    bar = tqdm(
        total=len(data),
        initial=sum(done) * shard_size,
        unit="sample",
        desc=f"extract {manifest['model']} {manifest['modality']}",
    )
    hooked = set(manifest["tap_points"]) | ({"residual"} if entropy else set())
    residual_layers = list(range(loaded.n_layers + 1))
    with capture_taps(loaded, sorted(hooked)) as captured, torch.no_grad():
        for k in range(n_shards):
            if done[k]:
                continue
            shard = data.iloc[k * shard_size : (k + 1) * shard_size]
            # Held until the shard is written: at most shard_size rows per tap x layer x pooling,
            # already in the stored dtype.
            pooled: dict[tuple[str, int], dict[str, list]] = {
                (tap, lay): {p: [] for p in manifest["poolings"]}
                for tap, tap_layers_ in layers.items()
                for lay in tap_layers_
            }
            entropies: list[np.ndarray] = []
            for start in range(0, len(shard), batch_size):
                rows = shard.iloc[start : start + batch_size]
                batch = prompts.encode_rows(loaded, rows, manifest["modality"], n_captions)
                loaded.model(**batch)
                masks = _masks(batch["input_ids"], batch["attention_mask"], loaded.image_token_id)
                for tap, lay, vectors in pooled_taps(
                    loaded, captured, layers, masks, manifest["poolings"], n_heads
                ):
                    for name, vec in vectors.items():
                        array = vec.cpu().numpy().astype(manifest["store_dtype"], copy=False)
                        pooled[(tap, lay)][name].append(array)
                if entropy:
                    entropies.append(
                        prompt_entropies(
                            captured["residual"], residual_layers, batch["attention_mask"]
                        )
                    )
                bar.update(len(rows))
            for (tap, lay), arrays in pooled.items():
                activations.write_shard(
                    partial,
                    tap,
                    lay,
                    k,
                    shard["id"].tolist(),
                    {p: np.concatenate(v) for p, v in arrays.items()},
                    dtype=manifest["store_dtype"],
                )
            if entropy:
                _write_entropy_part(
                    _entropy_part(partial, k),
                    shard["id"].tolist(),
                    residual_layers,
                    np.concatenate(entropies),
                )
    bar.close()
    if entropy and not (partial / PROMPT_ENTROPY).exists():
        _combine_entropy(partial, n_shards)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name (for the manifest)")
    add_spec_arguments(parser)
    parser.add_argument("--role", default="tuned")
    parser.add_argument("--data", type=Path, required=True, help="dataset (see vlmlayers.data)")
    parser.add_argument(
        "--modality",
        choices=["image", "text"],
        required=True,
        help="image: image + question; text: captions + the same question",
    )
    parser.add_argument("--out", type=Path, required=True, help="activation store directory")
    parser.add_argument(
        "--taps",
        nargs="+",
        default=["residual"],
        choices=TAPS,
        help="tap points: residual (block outputs, layers 0..L), mlp_out (MLP outputs before "
        "the residual add, 1..L), heads (each head through its slice of the attention output "
        "projection, stored as taps head.00, head.01, ..., 1..L); default: residual",
    )
    parser.add_argument(
        "--prompt-entropy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write {PROMPT_ENTROPY}: the matrix-based entropy of each prompt's residual token "
        "matrix (non-padding positions) per layer (default: on)",
    )
    parser.add_argument("--poolings", nargs="+", default=list(POOLINGS), choices=POOLINGS)
    parser.add_argument("--n-captions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto = bf16 GPU / fp32 CPU")
    parser.add_argument("--store-dtype", choices=["float16", "float32"], default="float32")
    parser.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")


def run(args: argparse.Namespace) -> None:
    device = setup_torch(seed=0)
    spec = ModelSpec.from_args(args, args.model, args.role)
    loaded = load(spec, device=device, dtype=resolve_dtype(args.dtype, device))
    if args.modality == "image" and not loaded.is_multimodal:
        raise ValueError(f"model {args.model!r} is text-only: it has no image modality")
    dataset = read_dataset(args.data, args.on_bad_rows, needs_image=args.modality == "image")
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} bad rows: {dataset.skipped[:5]} ...")
    poolings = poolings_for(args.poolings, args.modality, loaded)
    manifest = extraction_manifest(loaded, args.path, args.data, args, poolings, len(dataset.frame))
    manifest["skipped_rows"] = dataset.skipped
    extract(
        loaded, dataset.frame, args.out, manifest, args.batch_size, args.shard_size, args.n_captions
    )
