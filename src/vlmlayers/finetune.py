"""Selective fine-tuning by layer band (claim 4): stage-2 visual instruction tuning in which only
a band of decoder blocks (plus the projector) is trainable, with its training cost.

Actions (``vlmlayers finetune <action>``):
  train   tune one variant (a band) of an aligned VLM on VQA rows; save the model (safetensors),
          snapshots along the way, the loss curve and the cost in ``training.json``
  score   score a trained variant's snapshots and final model on the held-out benchmark
  table   gather the scored variants into one tidy table, at equal steps and equal time

Bands are relative depths, so one config fits any depth. Block ``i`` of ``L`` is in the band
``[lo, hi)`` when its centre ``(i + 0.5) / L`` is (``hi = 1`` includes the top block): with
thirds, 12 blocks split 4/4/4, 8 split 3/2/3, 24 split 8/8/8, 32 split 11/10/11. Named bands:
``full`` (every block, plus embeddings, final norm and LM head: the stage-2 recipe of LLaVA),
``early``, ``middle``, ``late`` (thirds) and ``complement`` (early + late); or ``LO:HI[,LO:HI]``.

Every variant uses the same data, steps, optimiser and seed (``vlmlayers.world.train.fit``:
AdamW, cosine schedule, resumable checkpoints that reproduce the uninterrupted run). Frozen
parameters get no gradient and no optimizer state; with a trainable projector the backward pass
still runs through the blocks below the band (activation gradients only), with
``--freeze-projector`` it stops at the band's lowest block. Cost: trainable
parameters, seconds per step (median after warm-up), total seconds, samples/s, peak memory (CUDA
allocator peak on GPU, process peak RSS on CPU).

``table`` rows: variant, band, layers, seed, comparison (``equal_steps``: the final models;
``equal_time``: each run's last snapshot within the shortest variant's mean training time;
``curve``: every snapshot, a snapshot every ``--snapshot-every`` steps),
step, trainable_params, train_seconds, step_seconds, samples_per_second, peak_mem_mb, modality,
task, subset, metric, accuracy, ci_low, ci_high, n.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from vlmlayers.data import read_dataset
from vlmlayers.depth import parse_band
from vlmlayers.io import atomic_path, write_parquet

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vlmlayers.models import LoadedModel

# train and score import torch, transformers and the evaluator (about 15 s) inside the action,
# so that `finetune table`, which only gathers tables, starts in a second

SNAPSHOTS = "snapshots"
WARMUP_STEPS = 5  # steps left out of the per-step time (allocator and kernel warm-up)
COLUMNS = [
    "variant", "band", "layers", "seed", "comparison", "step", "trainable_params",
    "train_seconds", "step_seconds", "samples_per_second", "peak_mem_mb", "modality", "task",
    "subset", "metric", "accuracy", "ci_low", "ci_high", "n",
]  # fmt: skip


def band_layers(n_layers: int, band: str) -> list[int]:
    """Decoder blocks whose centre ``(i + 0.5) / n_layers`` lies in the band."""
    ranges = parse_band(band)
    picked = [
        i for i in range(n_layers) if any(lo <= (i + 0.5) / n_layers < hi for lo, hi in ranges)
    ]
    if not picked:
        raise ValueError(f"band {band!r} holds none of the {n_layers} blocks")
    return picked


def trainable_modules(
    loaded: LoadedModel, layers: list[int], projector: bool = True
) -> list[nn.Module]:
    """The projector (unless ``projector=False``) and the given blocks; all blocks = full
    fine-tuning of the LLM, which also trains the embeddings, final norm and LM head (LLaVA's
    stage 2)."""
    modules = [loaded.projector] if projector and loaded.projector is not None else []
    modules += [loaded.layers[i] for i in layers]
    if len(layers) == loaded.n_layers:
        paths = loaded.paths
        modules += [loaded.module(p) for p in (paths.embeddings, paths.final_norm, paths.lm_head)]
    return modules


def peak_memory_mb(device: torch.device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_cost(log: pd.DataFrame, batch_size: int) -> dict:
    """Seconds per step (median after warm-up), total seconds and samples per second."""
    per_step = np.diff(log["seconds"].to_numpy(), prepend=0.0)
    per_step = per_step[min(WARMUP_STEPS, len(per_step) // 2) :]
    step_seconds = float(np.median(per_step)) if len(per_step) else float("nan")
    return {
        "train_seconds": float(log["seconds"].iloc[-1]) if len(log) else 0.0,
        "step_seconds": step_seconds,
        "samples_per_second": batch_size / step_seconds if step_seconds > 0 else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# train


def train(args: argparse.Namespace) -> None:
    import torch

    from vlmlayers.models import ModelSpec, load
    from vlmlayers.runtime import setup_torch
    from vlmlayers.world.train import (
        finish,
        fit,
        freeze_except,
        partial_dir,
        schedule,
        vlm_batches,
    )

    device = setup_torch(seed=args.seed)
    aligned = ModelSpec(name="aligned", path=str(args.aligned), role="aligned", dtype="float32")
    loaded = load(aligned, device=device, dtype=torch.float32)
    if not loaded.is_multimodal:
        raise SystemExit(f"{args.aligned}: selective fine-tuning needs a vision-language model")
    layers = band_layers(loaded.n_layers, args.band)
    modules = trainable_modules(loaded, layers, projector=not args.freeze_projector)
    n_trainable = freeze_except(loaded.model, modules)
    if args.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable()
    data = read_dataset(args.data, args.on_bad_rows, needs_image=True).frame
    make_batch = vlm_batches(loaded.processor, data, args.seed, args.batch_size, "vqa")
    snapshot_steps = set(range(args.snapshot_every, args.steps, args.snapshot_every or args.steps))

    def save_snapshot(step: int) -> None:
        if step in snapshot_steps:
            save_model(loaded, partial_dir(args.out) / SNAPSHOTS / f"step-{step:06d}")

    every = int(np.gcd.reduce([args.checkpoint_every, *snapshot_steps])) if snapshot_steps else 0
    print(f"{args.variant}: band {args.band} -> blocks {layers}, {n_trainable:,} trainable")
    log = fit(
        loaded.model,
        make_batch,
        args.out,
        desc=f"finetune {args.variant}",
        bf16=args.bf16,
        on_checkpoint=save_snapshot,
        **{**schedule(args), "checkpoint_every": every or args.checkpoint_every},
    )
    meta = {
        "role": "variant",
        "variant": args.variant,
        "band": args.band,
        "layers": layers,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "trainable_params": n_trainable,
        "projector_trained": not args.freeze_projector,
        "peak_mem_mb": peak_memory_mb(device),
        "device": str(device),
        **training_cost(log, args.batch_size),
    }
    finish(loaded.model, loaded.processor, args.out, log, meta, keep=(SNAPSHOTS,))
    print(json.dumps({k: meta[k] for k in ("variant", "trainable_params", "step_seconds")}))


def save_model(loaded: LoadedModel, out: Path) -> None:
    """Save a snapshot once (a resumed run that passes the step again keeps the first)."""
    if out.exists():
        return
    with atomic_path(out, is_dir=True) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.processor.save_pretrained(tmp)


# ---------------------------------------------------------------------------------------------
# score


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, directory) of a trained variant's snapshots, then its final model."""
    meta = json.loads((run / "training.json").read_text())
    found = [
        (int(p.name.split("-")[1]), p)
        for p in sorted((run / SNAPSHOTS).glob("step-*"))
        if p.is_dir()
    ]
    return [*found, (int(meta["steps"]), run)]


def score(args: argparse.Namespace) -> None:
    from vlmlayers import evaluate
    from vlmlayers.models import ModelSpec, load
    from vlmlayers.runtime import resolve_dtype, setup_torch

    device = setup_torch(seed=args.seed)
    meta = json.loads((args.run / "training.json").read_text())
    seconds = pd.read_csv(args.run / "losses.csv").set_index("step")["seconds"]
    data = read_dataset(args.data, args.on_bad_rows, needs_image="image" in args.modalities).frame
    if args.limit:
        data = data.head(args.limit)
    tables = []
    for step, path in checkpoints(args.run):
        spec = ModelSpec(name=meta["variant"], path=str(path), role="variant", dtype=args.dtype)
        loaded = load(spec, device=device, dtype=resolve_dtype(args.dtype, device))
        summary, _ = evaluate.score_model(
            loaded,
            data,
            args.modalities,
            seed=meta["seed"],
            n_boot=args.n_boot,
            n_captions=args.n_captions,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        logprob = summary[summary.metric == "answer_logprob"].set_index(
            ["modality", "task", "subset"]
        )
        rows = summary[summary.metric == "accuracy"].rename(columns={"value": "accuracy"})
        rows["answer_logprob"] = (
            logprob["value"]
            .reindex(pd.MultiIndex.from_frame(rows[["modality", "task", "subset"]]))
            .to_numpy()
        )
        rows = rows.assign(
            variant=meta["variant"],
            band=meta["band"],
            layers=",".join(map(str, meta["layers"])),
            seed=meta["seed"],
            step=step,
            final=step == meta["steps"],
            trainable_params=meta["trainable_params"],
            train_seconds=float(seconds.loc[step]),
            step_seconds=meta["step_seconds"],
            samples_per_second=meta["samples_per_second"],
            peak_mem_mb=meta["peak_mem_mb"],
        )
        tables.append(rows.drop(columns=["model", "role", "metric"]))
        del loaded
    table = pd.concat(tables, ignore_index=True)
    write_parquet(table, args.out)
    final = table[table["final"] & (table.subset == "all")]
    print(final[["variant", "modality", "task", "accuracy", "step_seconds"]].to_string(index=False))


# ---------------------------------------------------------------------------------------------
# table


def compare(scored: pd.DataFrame) -> pd.DataFrame:
    """Rows at equal steps (final models), at equal time (each run's last checkpoint whose
    training time is within the shortest variant's mean total training time) and the learning
    ``curve`` (every scored checkpoint, by step and training seconds)."""
    final = scored[scored["final"]]
    budget = final.groupby("variant")["train_seconds"].mean().min()
    within = scored[scored["train_seconds"] <= budget * (1 + 1e-9)]
    last = within.groupby(["variant", "seed"])["step"].transform("max")
    equal_time = within[within["step"] == last]
    return pd.concat(
        [
            final.assign(comparison="equal_steps"),
            equal_time.assign(comparison="equal_time"),
            scored.assign(comparison="curve"),
        ],
        ignore_index=True,
    ).drop(columns=["final"])


def table(args: argparse.Namespace) -> None:
    from vlmlayers.claims import read_tables

    scored = read_tables(args.runs)
    if scored is None or scored.empty:
        raise SystemExit("no scored variants given (--runs)")
    out = compare(scored)
    columns = [c for c in COLUMNS if c in out.columns]
    out = out[columns + [c for c in out.columns if c not in columns]]
    write_parquet(out, args.out)
    shown = out[(out.subset == "all") & (out.modality == "image")]
    print(
        shown.groupby(["comparison", "variant", "task"])[["accuracy", "step_seconds"]]
        .mean()
        .to_string()
    )


# ---------------------------------------------------------------------------------------------
# CLI

ACTIONS = {"train": train, "score": score, "table": table}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=list(ACTIONS), help="see above")
    parser.add_argument("--variant", default="middle", help="train: variant name")
    parser.add_argument("--band", default=None, help="train: band name or LO:HI (default: variant)")
    parser.add_argument("--aligned", type=Path, help="train: aligned VLM checkpoint")
    parser.add_argument("--data", type=Path, help="train: VQA rows; score: benchmark")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=100, help="resume points")
    parser.add_argument(
        "--snapshot-every",
        type=int,
        default=100,
        help="train: save a model every K steps, scored for the learning curve (0: final only)",
    )
    parser.add_argument(
        "--freeze-projector",
        action="store_true",
        help="train the band only (the backward pass then stops at its lowest block)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--run", type=Path, help="score: a trained variant's directory")
    parser.add_argument("--runs", type=Path, nargs="+", help="table: scored variants")
    parser.add_argument("--modalities", nargs="+", default=["image"], choices=["image", "text"])
    parser.add_argument("--n-captions", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--limit", type=int, default=0, help="score: only the first N rows")
    parser.add_argument("--dtype", default="auto", help="score: model dtype")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="directory (train) or Parquet")


def run(args: argparse.Namespace) -> None:
    args.band = args.band or args.variant
    needed = {"train": ("aligned", "data"), "score": ("run", "data"), "table": ("runs",)}
    missing = [f"--{k}" for k in needed[args.action] if not getattr(args, k)]
    if missing:
        raise SystemExit(f"finetune {args.action} needs {' '.join(missing)}")
    ACTIONS[args.action](args)
