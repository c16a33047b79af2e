"""Train the tiny world's checkpoints with real Hugging Face classes (saved by ``save_pretrained``).

Steps (``vlmlayers train <step>``):
  base     Llama-style LM pretrained on the text corpus (full-sequence loss), then instruction-,
           chat-, relation- and column-tuned (loss on replies); untied embeddings
  vision   CLIP-style vision tower: attribute heads on its patch tokens, every combination seen
  stage1   LLaVA stage 1 = ``aligned``: projector only (LM and tower frozen), image captioning
  stage2   LLaVA stage 2 = ``tuned``: projector + LM (or a band of its layers) on VQA

Every step trains on the device ``VLMLAYERS_DEVICE`` names (``auto``: a GPU when there is one)
and resumes from its last checkpoint after a crash; batches depend only on (seed, step), so a
resumed run reproduces the uninterrupted one.
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
from vlmlayers.io import atomic_path, hash_files, hash_tree, write_json
from vlmlayers.runtime import seed_everything, setup_torch
from vlmlayers.world import scenes
from vlmlayers.world.chat import REPLY_START
from vlmlayers.world.tokenizer import build_processor, build_tokenizer

CHECKPOINT_DIR = "checkpoint"
CPU = torch.device("cpu")


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

    ``make_batch(step)`` returns model kwargs incl. ``labels`` (moved to the model's device,
    dicts of tensors included);
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
    state = (
        torch.load(ckpt / "state.pt", map_location=CPU, weights_only=False)
        if ckpt.exists()
        else None
    )
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
        batch = {k: _on(device, v) for k, v in make_batch(step).items()}
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


def _on(device: torch.device, value):
    """``value`` (a tensor, a dict of tensors or anything else) on ``device``."""
    if isinstance(value, dict):
        return {k: _on(device, v) for k, v in value.items()}
    return value.to(device) if torch.is_tensor(value) else value


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
            if (partial / name).is_dir():
                shutil.copytree(partial / name, tmp / name, copy_function=_link_or_copy)
            elif (partial / name).exists():
                _link_or_copy(str(partial / name), str(tmp / name))
    shutil.rmtree(partial, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of large snapshots; the partial copy stays valid
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- base LM
def train_base(args: argparse.Namespace, device: torch.device = CPU) -> None:
    """The base LM, pretrained and then instruction-tuned as Vicuna was on LLaMA.

    Pretraining (``--steps``, full-sequence loss): the first ``--induction-steps`` draw only
    ``repeated_lists``, where induction heads (content-based copying) form; the next
    ``--curriculum`` only texts about one object (and facts); the rest the corpus with
    ``--repeat-share`` more lists. Instruction tuning (``--instruct-steps``, its own warm-up and
    schedule at ``--instruct-lr``): half of each batch the corpus's text-form QA with the loss on
    the reply only, half the rest of the pretraining mix. Chat tuning (``--chat-steps`` at
    ``--chat-lr``, as Vicuna was tuned on conversations): half of each batch
    ``scenes.chat_texts`` (a description where the VLM gets the image, then a question or the
    captioning request), a quarter text-form QA, a quarter the rest; the loss on everything
    after "assistant :" (``chat.REPLY_START``, so "Answer:" too) and on the whole of the rest.
    Relation tuning (``--relation-steps`` at ``--relation-lr``): half of each batch
    ``scenes.relation_texts`` (which row or column an object is in, where it is, how two
    relate), a quarter text-form QA, a quarter chat texts, the loss as in chat tuning. Column
    tuning (``--column-steps`` at ``--column-lr``): as relation tuning, but the first half of
    each batch the relation texts that need an object's column (``scenes.COLUMN_KINDS``: which
    column it is in, where it is, whether it is left or right of another) and a quarter as many
    of pretraining's word lists (in-context copying, which stage 1 needs, faded in the phases
    without them); ``--column-cycles`` runs it again from a fresh optimizer and warm-up on
    batches the first cycle did not draw (warm restarts, Loshchilov & Hutter 2017).
    Each tuning phase warms up over ``--warmup`` steps, as pretraining does.
    models/tinyworld/README.md has what each phase did: without the lists no lookup formed in
    a caption, without the instruction loss the QA did not use the lookups the statements had
    taught, without chat tuning stage 1 did not learn to pass colours on and `aligned`
    did not answer in the image form. Relation tuning lifted the text QA's rows and size
    comparisons to 1.00 but not horizontal (0.59), and stage 1 needs twice the steps to align
    from the LM it gives; its column questions are there because horizontal questions followed
    them in a drill, while drilling horizontal questions alone did not move them. Column
    tuning is that drill: horizontal followed once the column lookup had started (1.00 without
    the word lists, but then stage 1 did not align; with them 0.73 when they halved the chat
    quarter, 0.84 in the column half, 0.93 at twice the lr, 1.00 after a second cycle)."""
    if args.column_cycles < 1:
        raise SystemExit(
            f"--column-cycles {args.column_cycles}: column tuning runs at least one cycle "
            "(--column-steps 0 skips it)"
        )
    if args.eval_every % args.checkpoint_every:
        raise SystemExit(
            f"--eval-every {args.eval_every} is not a multiple of --checkpoint-every "
            f"{args.checkpoint_every}: the learning curve is scored at checkpoints"
        )
    corpus = pd.read_parquet(args.world / "corpus.parquet")
    world = json.loads((args.world / "world.json").read_text())  # its settings, for the manifest
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
    seed_everything(args.seed)  # the initial weights depend on the seed alone
    model = LlamaForCausalLM(config)
    model.to(device)  # initialised on the CPU: the same weights on every device
    encoded = tokenizer(corpus["text"].tolist(), add_special_tokens=True)["input_ids"]
    simple = [t for t, n in zip(encoded, corpus["objects"], strict=True) if n <= 1]
    lists_rng = np.random.default_rng([args.seed, len(corpus)])
    n_lists = round(args.repeat_share * len(corpus))
    lists = repeated_lists(world_words(tokenizer), lists_rng, n_lists, REPEAT_LENGTHS)
    lists = tokenizer(lists, add_special_tokens=True)["input_ids"] if lists else []
    mixed = encoded + lists
    reply_after = tokenizer(prompts.ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    qa = [t for t in encoded if prompts.find_last(t, reply_after) >= 0]
    not_qa = [t for t in mixed if prompts.find_last(t, reply_after) < 0]

    def pretrain_batch(step: int) -> dict:
        phases = ((args.induction_steps, lists), (args.curriculum, simple))
        texts, end = mixed, 0
        for length, phase_texts in phases:
            end += length
            if step < end:
                texts = phase_texts
                break
        rows = packed_rows(texts, batch_rng(args.seed, step), args.batch_size, args.context)
        return packed_batch(rows, tokenizer.pad_token_id)

    # The tuning phases' batch functions take the step counted from the start of pretraining,
    # so that each phase draws batches no other phase draws.
    def instruct_batch(step: int) -> dict:
        rng = batch_rng(args.seed, step)
        half = args.batch_size // 2
        rows = packed_rows(qa, rng, half, args.context)
        rows += packed_rows(not_qa, rng, args.batch_size - half, args.context)
        return packed_batch(rows, tokenizer.pad_token_id, reply_after)

    chat, relation, column = [], [], []
    if args.chat_steps or args.relation_steps or args.column_steps:
        chat_rng = np.random.default_rng([args.seed, CHAT_TEXTS])
        chat = scenes.chat_texts(CHAT_TEXTS, chat_rng)
        chat = tokenizer(chat, add_special_tokens=True)["input_ids"]
    if args.relation_steps:
        # the trailing 1 keeps this stream apart from chat's: numpy pads seeds with zeros
        relation_rng = np.random.default_rng([args.seed, RELATION_TEXTS, 1])
        relation = scenes.relation_texts(RELATION_TEXTS, relation_rng, world["n_captions"])
        relation = tokenizer(relation, add_special_tokens=True)["input_ids"]
    if args.column_steps:
        column_rng = np.random.default_rng([args.seed, RELATION_TEXTS, 2])
        column = scenes.relation_texts(
            RELATION_TEXTS, column_rng, world["n_captions"], scenes.COLUMN_KINDS
        )
        column = tokenizer(column, add_special_tokens=True)["input_ids"]
    column_and_lists = column + lists[: len(column) // 4]  # keeps the copying lists teach
    reply_start = tokenizer(REPLY_START, add_special_tokens=False)["input_ids"]

    def tuning_batch(step: int, main: list, extra: list) -> dict:
        """Half of the rows from ``main``, then a quarter text-form QA, then a quarter from
        ``extra`` (drawn in that order: chat tuning's batches as they always were); the loss
        after "assistant :" and on the whole of texts without it."""
        rng = batch_rng(args.seed, step)
        n = args.batch_size // 4
        rows = packed_rows(main, rng, args.batch_size - 2 * n, args.context)
        rows += packed_rows(qa, rng, n, args.context)
        rows += packed_rows(extra, rng, n, args.context)
        return packed_batch(rows, tokenizer.pad_token_id, reply_start)

    heldout_file = args.world / "test.parquet"
    heldout = pd.read_parquet(heldout_file) if heldout_file.exists() else None
    curve = partial_dir(args.out) / LEARNING_CURVE

    tuning = (
        ("instruct", "instruction tuning", instruct_batch, args.instruct_steps, args.instruct_lr),
        ("chat", "chat tuning", lambda step: tuning_batch(step, chat, not_qa),
         args.chat_steps, args.chat_lr),
        ("relation", "relation tuning", lambda step: tuning_batch(step, relation, chat),
         args.relation_steps, args.relation_lr),
        *(
            (f"column{cycle + 1 if cycle else ''}", f"column tuning, cycle {cycle + 1}",
             lambda step: tuning_batch(step, column_and_lists, chat),
             args.column_steps, args.column_lr)
            for cycle in range(args.column_cycles)
        ),
    )  # fmt: skip
    total = args.steps + sum(steps for *_, steps, _ in tuning)

    def score_curve(step: int) -> None:
        if heldout is None or not args.eval_every or step % args.eval_every or step == total:
            return
        point = json.dumps(
            {
                "step": step,
                **text_qa_accuracy(model, tokenizer, heldout.head(CURVE_QUESTIONS)),
                "induction_accuracy": induction_accuracy(model, tokenizer, args.seed),
            }
        )
        model.train()
        print(point, flush=True)
        curve.parent.mkdir(parents=True, exist_ok=True)
        with curve.open("a") as f:
            f.write(point + "\n")

    log = fit(
        model, pretrain_batch, args.out, desc="base LM", on_checkpoint=score_curve,
        **schedule(args),
    )  # fmt: skip
    for name, desc, make_batch, steps, lr in tuning:
        if not steps:
            continue
        done = int(log["step"].iloc[-1])
        tuned = fit(
            model, lambda step, f=make_batch, done=done: f(done + step),
            partial_dir(args.out) / name, desc=desc,
            on_checkpoint=lambda step, done=done: score_curve(done + step),
            **{**schedule(args), "steps": steps, "lr": lr},
        )  # fmt: skip
        tuned["step"] += done
        tuned["seconds"] += log["seconds"].iloc[-1]
        log = pd.concat([log, tuned], ignore_index=True)
    meta = {
        **_meta(args, "base", device),
        "world": world,
        "corpus_sha256": hash_files([args.world / "corpus.parquet"]),
    }
    qa = text_qa_accuracy(model, tokenizer, heldout) if heldout is not None else {}
    meta["metrics"] = {**qa, "induction_accuracy": induction_accuracy(model, tokenizer, args.seed)}
    finish(model, tokenizer, args.out, log, meta, keep=(LEARNING_CURVE,))


LEARNING_CURVE = "learning_curve.jsonl"  # held-out text QA along all base-LM phases
CURVE_QUESTIONS = 220  # the first rows of test.parquet: 20 of each question type
REPEAT_LENGTHS = (3, 25)  # words in each of the base LM's repeated_lists
CHAT_TEXTS = 20000  # scenes.chat_texts drawn for chat tuning
RELATION_TEXTS = 20000  # scenes.relation_texts drawn for relation tuning, and for column tuning


def world_words(tokenizer) -> np.ndarray:
    """The tokenizer's words (no punctuation or special tokens), sorted."""
    return np.array(sorted(w for w in tokenizer.get_vocab() if w.isalpha()))


def repeated_lists(
    words: np.ndarray, rng: np.random.Generator, n: int, lengths: tuple[int, int]
) -> list[str]:
    """``n`` lists of distinct random ``words`` said twice, each as long as a draw from
    ``lengths`` (inclusive): copy targets at varying distances, which content-based copying
    (induction heads) predicts and a head attending a fixed distance back does not."""
    texts = []
    for _ in range(n):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        listed = rng.choice(words, length, replace=False).tolist()
        texts.append(" ".join(listed + listed))
    return texts


INDUCTION_LISTS, INDUCTION_LENGTHS = 100, (4, 16)


@torch.no_grad()
def induction_accuracy(model, tokenizer, seed: int) -> float:
    """Top-1 accuracy on the second copy of ``INDUCTION_LISTS`` ``repeated_lists`` (its first
    word excluded): in-context copying by induction heads, which the first copy cannot predict
    (Olsson et al. 2022, "In-context learning and induction heads"). The lengths vary, so that
    positional copying (which lists of one length teach) does not score."""
    rng = np.random.default_rng([seed, INDUCTION_LISTS])
    texts = repeated_lists(world_words(tokenizer), rng, INDUCTION_LISTS, INDUCTION_LENGTHS)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = total = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        length = (ids.shape[1] - 1) // 2  # <s> + the list twice
        predicted = model(ids.to(device)).logits.argmax(-1).cpu()[0]
        # positions predicting words 2.. of the second copy
        hits += int((predicted[length + 1 : -1] == ids[0, length + 2 :]).sum())
        total += length - 1
    model.train(was_training)
    return hits / total


def text_qa_accuracy(model, tokenizer, rows: pd.DataFrame) -> dict:
    """The LM's exact-match accuracy on ``rows`` in the text form, overall and per question
    type (``labels.question_type``): the base LM's final metrics in its manifest."""
    from vlmlayers.evaluate import score_rows
    from vlmlayers.models import LoadedModel, ModelSpec, paths_for

    loaded = LoadedModel(
        spec=ModelSpec(name="base", path="", role="base"),
        model=model,
        processor=tokenizer,
        paths=paths_for(model.config.model_type),
        is_multimodal=False,
    )
    scored = score_rows(loaded, rows, "text", desc="held-out text QA").merge(rows, on="id")
    by = scored.groupby(scored.get("labels.question_type", scored["task"]))["correct"].mean()
    return {
        "text_accuracy": float(scored["correct"].mean()),
        "text_accuracy_by_question_type": {k: float(v) for k, v in by.items()},
        "n": len(scored),
    }


def packed_rows(
    encoded: list[list[int]], rng: np.random.Generator, batch_size: int, context: int
) -> list[list[list[int]]]:
    """``batch_size`` rows of whole texts drawn at random, each row filled with texts up to
    ``context`` tokens (a text that does not fit starts the next row; 0: one text per row), so
    no compute is spent on padding short texts."""
    rows: list[list[list[int]]] = [[]]
    while len(rows) <= batch_size:
        text = encoded[int(rng.integers(len(encoded)))]
        used = sum(map(len, rows[-1]))
        if rows[-1] and (not context or used + len(text) > context):
            rows.append([])
        rows[-1].append(text)
    return rows[:batch_size]


def packed_batch(
    rows: list[list[list[int]]], pad_id: int, reply_after: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows: each text sees only itself (a block-diagonal causal mask,
    positions restarting at 0), exactly as if it were alone, and is its own loss; padding
    (right) is masked out of the loss. With ``reply_after`` (token ids), a text holding them is
    a prompt and its reply: its loss is the tokens after their last occurrence only (the
    instruction loss, as ``prompts.encode`` sets it)."""
    length = max(sum(map(len, row)) for row in rows)
    ids = torch.full((len(rows), length), pad_id)
    doc = torch.zeros((len(rows), length), dtype=torch.long)  # text k; -k: a prompt's tokens
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, text in enumerate(row, start=1):
            end = start + len(text)
            ids[r, start:end] = torch.tensor(text)
            doc[r, start:end] = k
            positions[r, start:end] = torch.arange(len(text))
            prompt = prompts.find_last(text, reply_after) if reply_after else -1
            if prompt >= 0:
                doc[r, start : start + prompt + len(reply_after)] *= -1  # seen, not a target
            start = end
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    document = doc.abs()  # which text a token belongs to (0: padding, which attends to padding:
    mask = (document[:, :, None] == document[:, None, :]) & causal  # no NaN)
    labels = ids.masked_fill(doc <= 0, -100)
    labels[:, 0] = -100
    labels[:, 1:].masked_fill_(document[:, 1:] != document[:, :-1], -100)  # a text's first token
    return {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": positions,
            "labels": labels}  # fmt: skip


# --------------------------------------------------------------------------- vision tower
class AttributeHeads(nn.Module):
    """CLIP vision tower + one linear head per (grid cell, attribute) on the flattened patch
    tokens, so each patch token must carry what it shows and where (the cell is empty or
    holds one object)."""

    def __init__(self, tower: CLIPVisionModel, classes: dict[str, list[str]]):
        super().__init__()
        self.tower = tower
        width = tower.config.hidden_size * (tower.config.image_size // tower.config.patch_size) ** 2
        self.heads = nn.ModuleDict({a: nn.Linear(width, len(c)) for a, c in classes.items()})

    def logits(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
        flat = patches.flatten(1)
        return {a: h(flat) for a, h in self.heads.items()}

    def forward(self, pixel_values: torch.Tensor, labels: dict[str, torch.Tensor]):
        logits = self.logits(pixel_values)
        loss = sum(nn.functional.cross_entropy(x, labels[a]) for a, x in logits.items())
        return _Output(loss=loss / len(self.heads))


class _Output(dict):
    def __getattr__(self, name):
        return self[name]


EMPTY = "none"


def cell_classes() -> dict[str, list[str]]:
    """Head name ("<cell>/<attribute>") -> its classes: the attribute's values or ``none``."""
    values = {"shape": scenes.SHAPES, "colour": tuple(scenes.COLOURS), "size": tuple(scenes.SIZES)}
    return {f"{c}/{a}": [EMPTY, *v] for c in scenes.CELLS for a, v in values.items()}


def cell_targets(scene: scenes.Scene, classes: dict[str, list[str]]) -> dict[str, int]:
    """The class index of every head for ``scene``."""
    things = {t.cell: t for t in scene.things}
    targets = {}
    for name, options in classes.items():
        cell, attribute = name.split("/")
        thing = things.get(cell)
        targets[name] = options.index(getattr(thing, attribute) if thing else EMPTY)
    return targets


def train_vision(args: argparse.Namespace, device: torch.device = CPU) -> None:
    processor = build_processor(build_tokenizer(["x"]), args.image_size, args.patch)
    config = CLIPVisionConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        image_size=args.image_size,
        patch_size=args.patch,
    )
    classes = cell_classes()
    model = AttributeHeads(CLIPVisionModel(config), classes).to(device)
    # The tower sees every combination (like CLIP on web data); pairs are held out only later.
    pixels, targets = scene_tensors(processor, args.n_images, args.image_size, args.seed, classes)

    def make_batch(step: int) -> dict:
        rows = torch.from_numpy(
            batch_rng(args.seed, step).integers(0, len(pixels), args.batch_size)
        )
        return {"pixel_values": pixels[rows], "labels": {a: t[rows] for a, t in targets.items()}}

    log = fit(model, make_batch, args.out, desc="vision tower", **schedule(args))
    # final metrics: every head on fresh scenes (another seed), per attribute over the cells
    pixels, targets = scene_tensors(processor, 1000, args.image_size, args.seed + 1, classes)
    with torch.no_grad():
        logits = model.logits(pixels.to(device))
    hits = {a: (logits[a].argmax(-1).cpu() == targets[a]).float().mean().item() for a in classes}
    metrics = {
        f"heldout_accuracy_{attr}": float(np.mean([v for a, v in hits.items() if a.endswith(attr)]))
        for attr in ("shape", "colour", "size")
    }
    meta = {**_meta(args, "vision", device), "metrics": {**metrics, "n": 1000}}
    finish(model.tower, processor.image_processor, args.out, log, meta)


def scene_tensors(processor, n: int, image_size: int, seed: int, classes: dict[str, list[str]]):
    """``n`` random scenes (every combination allowed) as pixel values and head targets."""
    rng = np.random.default_rng(seed)
    pool = [scenes.random_scene(rng) for _ in range(n)]
    images = [Image.open(io.BytesIO(scenes.render(s, rng, image_size))) for s in pool]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    per_scene = [cell_targets(s, classes) for s in pool]
    return pixels, {a: torch.tensor([t[a] for t in per_scene]) for a in classes}


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


def train_vlm(
    model, processor, trainable: list[nn.Module], args, task: str, role: str, device: torch.device
) -> None:
    """Stage 1 or 2: train ``trainable`` modules on the world's ``task`` batches (on ``device``),
    then save."""
    model.to(device)
    n_trainable = freeze_except(model, trainable)
    data = pd.read_parquet(args.world / "train.parquet")
    make_batch = vlm_batches(processor, data, args.seed, args.batch_size, task)
    log = fit(model, make_batch, args.out, desc=f"{task} ({role})", **schedule(args))
    meta = {**_meta(args, role, device), "trainable_params": n_trainable}
    finish(model, processor, args.out, log, meta)


def train_stage1(args: argparse.Namespace, device: torch.device = CPU) -> None:
    """LLaVA stage 1: the projector alone learns to caption; LM and tower stay frozen."""
    model, processor = compose_llava(args.base, args.vision, args.image_size, args.patch)
    projector = [model.model.multi_modal_projector]
    train_vlm(model, processor, projector, args, "caption", "aligned", device)


def train_stage2(args: argparse.Namespace, device: torch.device = CPU) -> None:
    """LLaVA stage 2: projector + the whole LM on image-form VQA; the tower stays frozen."""
    from vlmlayers.finetune import trainable_modules
    from vlmlayers.models import ModelSpec, load

    loaded = load(ModelSpec(name="aligned", path=str(args.aligned), role="aligned"))
    trainable = trainable_modules(loaded, list(range(loaded.n_layers)))
    train_vlm(loaded.model, loaded.processor, trainable, args, "vqa", "tuned", device)


def schedule(args: argparse.Namespace) -> dict:
    """The optimisation settings every training step shares (``fit`` keyword arguments)."""
    return dict(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )


def _meta(args: argparse.Namespace, role: str, device: torch.device) -> dict:
    from vlmlayers import __version__

    params = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func",)
    }
    return {
        "role": role,
        "params": params,
        "device": device.type,
        "vlmlayers_version": __version__,
        "code_sha256": hash_files(sorted(Path(__file__).parent.glob("*.py"))),
    }


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
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--patch", type=int, default=12)
    parser.add_argument("--n-images", type=int, default=4000, help="vision-tower training images")
    parser.add_argument(
        "--curriculum",
        type=int,
        default=0,
        help="base: steps at the start that draw only texts about one object (and facts)",
    )
    parser.add_argument(
        "--induction-steps",
        type=int,
        default=0,
        help="base: steps at the start that draw only random word lists said twice",
    )
    parser.add_argument(
        "--repeat-share",
        type=float,
        default=0.0,
        help="base: word lists said twice added to the corpus, as a share of its texts",
    )
    tuning_phases = (  # flag prefix, what its steps are, default peak lr
        ("instruct", "instruction-tuning steps after pretraining (loss on text-form QA "
         "replies)", 1e-3),
        ("chat", "chat-tuning steps after instruction tuning (a description, then a question "
         "or the captioning request; the loss on the replies)", 5e-4),
        ("relation", "relation-tuning steps after chat tuning (which row or column an object "
         "is in, where it is, how two relate; the loss on the replies)", 5e-4),
        ("column", "column-tuning steps after relation tuning (which column an object is in, "
         "where it is, whether it is left or right of another; the loss on the replies)", 5e-4),
    )  # fmt: skip
    for phase, steps_help, lr in tuning_phases:
        parser.add_argument(f"--{phase}-steps", type=int, default=0, help=f"base: {steps_help}")
        parser.add_argument(f"--{phase}-lr", type=float, default=lr, help="base: their peak lr")
    parser.add_argument(
        "--column-cycles",
        type=int,
        default=1,
        help="base: column tuning as this many cosine cycles of --column-steps, each warming up "
        "again with a fresh optimizer (warm restarts, Loshchilov & Hutter 2017)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help=f"base: score {CURVE_QUESTIONS} held-out questions every N steps (a multiple of "
        f"--checkpoint-every) into {LEARNING_CURVE} (0: only the final score)",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=0,
        help="base: pack whole corpus texts into rows of this many tokens (0: one text a row)",
    )


def run(args: argparse.Namespace) -> None:
    STEPS[args.step](args, device=setup_torch(seed=args.seed))
    print(json.dumps({"trained": args.step, "out": str(args.out)}))
