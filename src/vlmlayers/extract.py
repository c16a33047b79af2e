"""Extract per-layer residual-stream vectors into Parquet shards (see ``vlmlayers.activations``).

One forward pass per batch; forward hooks on the decoder blocks (module paths from
``vlmlayers.models``) capture layer 0 = the input of block 0 (embeddings, with image features
merged in) and layer l = the raw output of block l, *before* the final norm for the last block
(HF's last ``hidden_states`` entry has the norm applied; the manifest says which is stored).

Poolings: ``last`` (last prompt token), ``mean_image`` (mean over image-token positions),
``mean_text`` (mean over the other non-padding positions). Memory is bounded by the shard size.
Resumable: shards go to ``<out>.partial/`` and completed shards are kept across restarts; the
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
import torch
from tqdm import tqdm

from vlmlayers import __version__, activations, prompts
from vlmlayers.data import read_dataset
from vlmlayers.io import hash_files, hash_tree, write_json
from vlmlayers.models import LoadedModel, ModelSpec, add_spec_arguments, load
from vlmlayers.runtime import resolve_dtype, setup_torch

POOLINGS = ("last", "mean_image", "mean_text")
TAP = "residual"


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


def pool(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    image_token_id: int | None,
    poolings: list[str],
) -> dict[str, np.ndarray]:
    """Pool a (B, T, D) layer output per sample (left padding: last position is the last token)."""
    hidden = hidden.float()
    is_image = (
        (input_ids == image_token_id)
        if image_token_id is not None
        else torch.zeros_like(input_ids, dtype=torch.bool)
    )
    real = attention.bool()
    masks = {"mean_image": is_image & real, "mean_text": ~is_image & real}
    out = {}
    for name in poolings:
        if name == "last":
            out[name] = hidden[:, -1]
        else:
            mask = masks[name].unsqueeze(-1).to(hidden.dtype)
            out[name] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return {k: v.cpu().numpy() for k, v in out.items()}


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
        "tap": TAP,
        "layers": list(range(loaded.n_layers + 1)),
        "n_layers": loaded.n_layers,
        "layer_convention": "0 = input of decoder block 0; l = output of block l; the last "
        "layer is stored BEFORE the final norm",
        "poolings": poolings,
        "n": n,
        "shard_size": args.shard_size,
        "vlmlayers_version": __version__,
    }


def _params_key(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "vlmlayers_version"}


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
    layer_ids = manifest["layers"]
    n_shards = -(-len(data) // shard_size)
    done = [
        all(activations.shard_path(partial, TAP, lay, k).exists() for lay in layer_ids)
        for k in range(n_shards)
    ]
    if any(done):
        print(f"resuming {partial}: {sum(done)}/{n_shards} shards already written")
    bar = tqdm(
        total=len(data),
        initial=sum(done) * shard_size,
        unit="sample",
        desc=f"extract {manifest['model']} {manifest['modality']}",
    )
    with capture_residuals(loaded) as captured, torch.no_grad():
        for k in range(n_shards):
            if done[k]:
                continue
            shard = data.iloc[k * shard_size : (k + 1) * shard_size]
            pooled: dict[int, dict[str, list]] = {
                lay: {p: [] for p in manifest["poolings"]} for lay in layer_ids
            }
            for start in range(0, len(shard), batch_size):
                rows = shard.iloc[start : start + batch_size]
                batch = prompts.encode_rows(loaded, rows, manifest["modality"], n_captions)
                loaded.model(**batch)
                for lay in layer_ids:
                    for name, array in pool(
                        captured[lay],
                        batch["input_ids"],
                        batch["attention_mask"],
                        loaded.image_token_id,
                        manifest["poolings"],
                    ).items():
                        pooled[lay][name].append(array)
                bar.update(len(rows))
            for lay in layer_ids:
                activations.write_shard(
                    partial,
                    TAP,
                    lay,
                    k,
                    shard["id"].tolist(),
                    {p: np.concatenate(v) for p, v in pooled[lay].items()},
                    dtype=manifest["store_dtype"],
                )
    bar.close()
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
