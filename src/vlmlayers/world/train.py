"""Train the tiny world's checkpoints with real Hugging Face classes (saved by ``save_pretrained``).

Steps (``vlmlayers train <step>``):
  base     Llama-style LM on the text corpus (full-sequence loss, untied embeddings)
  vision   CLIP-style vision tower: attribute heads on its patch tokens, every combination seen
  stage1   LLaVA stage 1 = ``aligned``: projector only (LM and tower frozen), image captioning
  stage2   LLaVA stage 2 = ``tuned``: projector + LM (or a band of its layers) on VQA

Every step resumes from its last checkpoint after a crash; batches depend only on (seed, step),
so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)

from vlmlayers import prompts
from vlmlayers.io import atomic_path, hash_tree, write_json
from vlmlayers.runtime import setup_torch
from vlmlayers.world import scenes
from vlmlayers.world.tokenizer import build_processor, build_tokenizer

CHECKPOINT_DIR = "checkpoint"


def partial_dir(out: Path) -> Path:
    """Where a run keeps what it resumes from: beside ``out``, because Snakemake deletes an
    output directory before it reruns the job (as extraction's ``<out>.partial``)."""
    return out.with_name(out.name + ".partial")


def decode_images(column) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in column]


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The RNG of one training step: resumed runs draw the same batches."""
    return np.random.default_rng([seed, step])


def fit(
    model: nn.Module,
    make_batch: Callable[[int], dict],
    out: Path,
    *,
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    checkpoint_every: int,
    desc: str,
    weight_decay: float = 0.0,
    bf16: bool = False,
    on_checkpoint: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """AdamW + cosine schedule over the model's trainable parameters, with resume.

    ``make_batch(step)`` returns model kwargs incl. ``labels`` (moved to the model's device);
    ``model(**batch).loss`` is minimised, under bf16 autocast on CUDA when ``bf16``. Frozen
    parameters get no optimizer state. State is saved atomically under ``out/checkpoint`` every
    ``checkpoint_every`` steps, after ``on_checkpoint(step)``; the loss curve (step, loss, lr,
    seconds of training, saving excluded) is returned.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    ckpt = partial_dir(out) / CHECKPOINT_DIR
    settings = {"steps": steps, "lr": lr, "warmup": warmup, "seed": seed,
                "weight_decay": weight_decay, "trainable": [n for n, _ in named]}  # fmt: skip
    start, log = 0, []
    state = torch.load(ckpt / "state.pt", weights_only=False) if ckpt.exists() else None
    if state is not None and state.get("settings") != settings:
        print(f"{desc}: {ckpt} is from other settings; starting afresh")
        state = None
    if state is not None:
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, log = state["step"], state["log"]
        print(f"{desc}: resuming from step {start} ({ckpt})")
    torch.manual_seed(seed + start)
    device = next(model.parameters()).device
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"
    )
    model.train()
    t0 = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, unit="step")
    for step in bar:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_batch(step).items()}
        with autocast:
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        schedule.step()
        log.append(
            {
                "step": step + 1,
                "loss": loss.item(),
                "lr": schedule.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == steps:
            paused = time.perf_counter()
            if on_checkpoint:  # first: a crash before the state is saved redoes these steps
                on_checkpoint(done)
            trainable = {n: p.detach().clone() for n, p in named}
            with atomic_path(ckpt, is_dir=True) as tmp:
                torch.save(
                    {
                        "trainable": trainable,
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "step": done,
                        "log": log,
                        "settings": settings,
                    },
                    tmp / "state.pt",
                )
            t0 += time.perf_counter() - paused  # `seconds` counts training, not saving
    model.eval()
    return pd.DataFrame(log)


def finish(
    model, processor, out: Path, log: pd.DataFrame, meta: dict, keep: tuple[str, ...] = ()
) -> None:
    """Save the model (safetensors), its processor, loss curve and manifest atomically under
    ``out``, with the ``keep`` entries of the partial directory (hard links); drop the rest."""
    partial = partial_dir(out)
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        log.to_csv(tmp / "losses.csv", index=False)
        manifest = {
            **meta,
            "weights_sha256": hash_tree(tmp, "*.safetensors"),
            "final_loss": float(log["loss"].tail(20).mean()) if len(log) else None,
        }
        write_json(manifest, tmp / "training.json")
        for name in keep:
            if (partial / name).exists():
                shutil.copytree(partial / name, tmp / name, copy_function=_link_or_copy)
    shutil.rmtree(partial, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of large snapshots; the partial copy stays valid
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- base LM
def train_base(args: argparse.Namespace) -> None:
    corpus = pd.read_parquet(args.world / "corpus.parquet")["text"].tolist()
    tokenizer = build_tokenizer(scenes.vocabulary_texts())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    encoded = tokenizer(corpus, add_special_tokens=True)["input_ids"]

    def make_batch(step: int) -> dict:
        rows = batch_rng(args.seed, step).integers(0, len(encoded), args.batch_size)
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return {**batch, "labels": labels}

    log = fit(model, make_batch, args.out, desc="base LM", **schedule(args))
    finish(model, tokenizer, args.out, log, _meta(args, "base"))


# --------------------------------------------------------------------------- vision tower
ATTRIBUTES = ("shape", "colour", "size", "position", "count")


class AttributeHeads(nn.Module):
    """CLIP vision tower + one linear head per scene attribute on the flattened patch tokens,
    so each patch token must carry what (and where) it shows."""

    def __init__(self, tower: CLIPVisionModel, classes: dict[str, list[str]]):
        super().__init__()
        self.tower = tower
        width = tower.config.hidden_size * (tower.config.image_size // tower.config.patch_size) ** 2
        self.heads = nn.ModuleDict({a: nn.Linear(width, len(c)) for a, c in classes.items()})

    def forward(self, pixel_values: torch.Tensor, labels: dict[str, torch.Tensor]):
        patches = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
        flat = patches.flatten(1)
        loss = sum(nn.functional.cross_entropy(h(flat), labels[a]) for a, h in self.heads.items())
        return _Output(loss=loss / len(self.heads))


class _Output(dict):
    def __getattr__(self, name):
        return self[name]


def train_vision(args: argparse.Namespace) -> None:
    processor = build_processor(build_tokenizer(["x"]), args.image_size, args.patch)
    config = CLIPVisionConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        image_size=args.image_size,
        patch_size=args.patch,
    )
    classes = {
        "shape": list(scenes.SHAPES),
        "colour": list(scenes.COLOURS),
        "size": list(scenes.SIZES),
        "position": list(scenes.POSITIONS),
        "count": [str(c) for c in scenes.COUNTS],
    }
    model = AttributeHeads(CLIPVisionModel(config), classes)
    # The tower sees every combination (like CLIP on web data); pairs are held out only later.
    rng = np.random.default_rng(args.seed)
    pool = [scenes.ALL_SCENES[i] for i in rng.integers(0, len(scenes.ALL_SCENES), args.n_images)]
    images = [Image.open(io.BytesIO(scenes.render(s, rng, args.image_size))) for s in pool]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    targets = {
        a: torch.tensor([classes[a].index(str(getattr(s, a))) for s in pool]) for a in classes
    }

    def make_batch(step: int) -> dict:
        rows = torch.from_numpy(batch_rng(args.seed, step).integers(0, len(pool), args.batch_size))
        return {"pixel_values": pixels[rows], "labels": {a: t[rows] for a, t in targets.items()}}

    log = fit(model, make_batch, args.out, desc="vision tower", **schedule(args))
    finish(model.tower, processor.image_processor, args.out, log, _meta(args, "vision"))


# --------------------------------------------------------------------------- stages 1 and 2
def compose_llava(base_dir: Path, vision_dir: Path, image_size: int, patch: int):
    """An untrained-projector LLaVA from the base LM and the vision tower (strict weight loads)."""
    from transformers import AutoTokenizer

    base = LlamaForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    tower = CLIPVisionModel.from_pretrained(vision_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    processor = build_processor(tokenizer, image_size, patch)
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=base.config,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(base.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(base.lm_head.state_dict(), strict=True)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    return model, processor


def vlm_batches(processor, data: pd.DataFrame, seed: int, batch_size: int, task: str):
    """Batches for stage 1 (``caption``: image -> caption) or stage 2 (``vqa``: image form QA)."""
    images = decode_images(data["image"])

    def make_batch(step: int) -> dict:
        rows = batch_rng(seed, step).integers(0, len(data), batch_size)
        picked = data.iloc[rows]
        if task == "caption":
            conversations = [prompts.caption_messages()] * len(rows)
            replies = picked["caption"].tolist()
        else:
            conversations = [prompts.image_messages(q) for q in picked["question"]]
            replies = picked["answer"].tolist()
        return dict(prompts.encode(processor, conversations, [images[i] for i in rows], replies))

    return make_batch


def freeze_except(model: nn.Module, trainable: list[nn.Module]) -> int:
    """Freeze everything but ``trainable`` modules; return the trainable parameter count."""
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_vlm(model, processor, trainable: list[nn.Module], args, task: str, role: str) -> None:
    """Stage 1 or 2: train ``trainable`` modules on the world's ``task`` batches, then save."""
    n_trainable = freeze_except(model, trainable)
    data = pd.read_parquet(args.world / "train.parquet")
    make_batch = vlm_batches(processor, data, args.seed, args.batch_size, task)
    log = fit(model, make_batch, args.out, desc=f"{task} ({role})", **schedule(args))
    finish(model, processor, args.out, log, {**_meta(args, role), "trainable_params": n_trainable})


def train_stage1(args: argparse.Namespace) -> None:
    """LLaVA stage 1: the projector alone learns to caption; LM and tower stay frozen."""
    model, processor = compose_llava(args.base, args.vision, args.image_size, args.patch)
    train_vlm(model, processor, [model.model.multi_modal_projector], args, "caption", "aligned")


def train_stage2(args: argparse.Namespace) -> None:
    """LLaVA stage 2: projector + the whole LM on image-form VQA; the tower stays frozen."""
    from vlmlayers.finetune import trainable_modules
    from vlmlayers.models import ModelSpec, load

    loaded = load(ModelSpec(name="aligned", path=str(args.aligned), role="aligned"))
    trainable = trainable_modules(loaded, list(range(loaded.n_layers)))
    train_vlm(loaded.model, loaded.processor, trainable, args, "vqa", "tuned")


def schedule(args: argparse.Namespace) -> dict:
    """The optimisation settings every training step shares (``fit`` keyword arguments)."""
    return dict(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )


def _meta(args: argparse.Namespace, role: str) -> dict:
    from vlmlayers import __version__

    params = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func",)
    }
    return {"role": role, "params": params, "vlmlayers_version": __version__}


STEPS = {"base": train_base, "vision": train_vision, "stage1": train_stage1, "stage2": train_stage2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("step", choices=sorted(STEPS), help="what to train (see above)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--world", type=Path, help="tiny-world directory (vlmlayers world)")
    parser.add_argument("--base", type=Path, help="base LM checkpoint (stage1)")
    parser.add_argument("--vision", type=Path, help="vision tower checkpoint (stage1)")
    parser.add_argument("--aligned", type=Path, help="aligned VLM checkpoint (stage2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--layers", type=int, default=12, help="decoder / encoder layers")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--n-images", type=int, default=4000, help="vision-tower training images")


def run(args: argparse.Namespace) -> None:
    setup_torch(seed=args.seed)
    STEPS[args.step](args)
    print(json.dumps({"trained": args.step, "out": str(args.out)}))
