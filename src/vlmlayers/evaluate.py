"""Score a model on a VQA benchmark in both prompt forms (greedy answer + answer log-probability).

Scoring is exact match after :func:`normalise_answer` (never substring matching: an empty
prediction scores 0). Writes a tidy table (model, role, modality, task, subset, metric, value,
ci_low, ci_high, n, seed) and, optionally, the per-sample predictions.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from vlmlayers import prompts
from vlmlayers.data import read_dataset
from vlmlayers.io import write_parquet
from vlmlayers.models import LoadedModel, ModelSpec, add_spec_arguments, load
from vlmlayers.runtime import setup_torch
from vlmlayers.stats import bootstrap_ci

_NUMBERS = "zero one two three four five six seven eight nine ten"
NUMBER_WORDS = {w: str(i) for i, w in enumerate(_NUMBERS.split())}  # noqa: SIM905
ARTICLES = {"a", "an", "the"}
_NO_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


def normalise_answer(text: str | None) -> str:
    """Lower-case, drop punctuation and articles, map number words to digits, squeeze spaces."""
    if text is None:
        return ""
    text = text.lower().translate(_NO_PUNCTUATION)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str | None, answer: str) -> bool:
    """True iff both normalise to the same non-empty string."""
    pred = normalise_answer(prediction)
    return bool(pred) and pred == normalise_answer(answer)


def caption_words(text: str | None) -> str:
    """A caption as CIDEr's references are tokenised: lower case, punctuation dropped, single
    spaces (what coco-caption's Java PTB tokenizer does to plain ASCII captions)."""
    if text is None:
        return ""
    return " ".join(text.lower().translate(_NO_PUNCTUATION).split())


def cider(predictions: list[str | None], references: list[list[str]]) -> np.ndarray:
    """Per-image CIDEr-D (Vedantam, Zitnick & Parikh 2015, CVPR) by pycocoevalcap's scorer (n=4,
    sigma=6, document frequencies from these references); the corpus score is the mean. A
    missing prediction is an empty caption (score 0)."""
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return np.array([])
    keys = range(len(predictions))
    res = {k: [caption_words(p)] for k, p in zip(keys, predictions, strict=True)}
    gts = {k: [caption_words(r) for r in refs] for k, refs in zip(keys, references, strict=True)}
    _, scores = Cider().compute_score(gts, res)
    return np.asarray(scores, dtype=float)


@torch.no_grad()
def answer_logprob(loaded: LoadedModel, batch) -> torch.Tensor:
    """Sum of log-probabilities of the reply tokens (``labels`` != -100, EOS excluded)."""
    return reply_scores(loaded, batch)[0]


@torch.no_grad()
def reply_scores(loaded: LoadedModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the reply tokens (``labels`` != -100, EOS
    excluded) and whether greedy decoding would produce every one of them."""
    labels = batch.pop("labels")
    logits = loaded.model(**batch).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    # drop each row's last reply token (EOS) so the score is about the answer itself
    last = mask.cumsum(1) == mask.sum(1, keepdim=True)
    mask &= ~last
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    greedy = ((logp.argmax(-1) == targets) | ~mask).all(1)
    return (picked * mask).sum(1), greedy


ANSWER_STOPS = ("\n", ".")  # a short answer ends at the first line break or full stop


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel, batch, max_new_tokens: int, until: tuple[str, ...] = ANSWER_STOPS
) -> list[str]:
    """Greedy continuations, each cut at the first of the ``until`` strings and stripped."""
    out = loaded.model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    texts = loaded.tokenizer.batch_decode(new, skip_special_tokens=True)
    stops = "|".join(re.escape(s) for s in until if s)
    return [(re.split(stops, t.strip())[0] if stops else t).strip() for t in texts]


def score_rows(
    loaded: LoadedModel,
    data: pd.DataFrame,
    modality: str,
    *,
    n_captions: int = 2,
    batch_size: int = 32,
    max_new_tokens: int = 5,
    desc: str = "",
    scoring_context: Callable[[dict], contextlib.AbstractContextManager] | None = None,
) -> pd.DataFrame:
    """Per-sample prediction, correctness and answer log-probability.

    ``scoring_context(batch)``, when given, wraps the teacher-forced pass (interventions use it
    to learn where each prompt ends)."""
    results = []
    for start in tqdm(
        range(0, len(data), batch_size), desc=desc or f"eval {modality}", unit="batch", leave=False
    ):
        rows = data.iloc[start : start + batch_size]
        prediction = generate_answers(
            loaded, prompts.encode_rows(loaded, rows, modality, n_captions), max_new_tokens
        )
        full = prompts.encode_rows(loaded, rows, modality, n_captions, rows["answer"].tolist())
        with scoring_context(full) if scoring_context else contextlib.nullcontext():
            logprob = answer_logprob(loaded, full)
        for (_, row), pred, lp in zip(rows.iterrows(), prediction, logprob.tolist(), strict=True):
            results.append(
                {
                    "id": row["id"],
                    "modality": modality,
                    "prediction": pred,
                    "correct": exact_match(pred, row["answer"]),
                    "answer_logprob": lp,
                }
            )
    return pd.DataFrame(results)


SCORED_COLUMNS = (("accuracy", "correct"), ("answer_logprob", "answer_logprob"))
QUESTION_TYPE = "labels.question_type"  # per-type accuracy rows when a dataset labels it


def standard_error(values: np.ndarray) -> float:
    """Sample SD / sqrt(n) (NaN below 2 values), as lmms-eval reports a mean's stderr."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else math.nan


def summarise(
    scored: pd.DataFrame, data: pd.DataFrame, model: str, role: str, seed: int, n_boot: int = 1000
) -> pd.DataFrame:
    """Tidy rows per modality x task x subset that holds items (all / seen / heldout pairs when
    known, and ``question_type=<type>`` when the data has ``labels.question_type``): accuracy
    (and answer log-probability when scored) with a bootstrap CI and the standard error of the
    mean (:func:`standard_error`)."""
    metrics = [(m, c) for m, c in SCORED_COLUMNS if c in scored]
    merged = scored.merge(data.drop(columns=["image"], errors="ignore"), on="id")
    merged["task"] = merged.get("task", "all")
    subsets = {"all": np.ones(len(merged), bool)}
    if "heldout_pair" in merged:
        subsets |= {
            "seen": ~merged["heldout_pair"].to_numpy(bool),
            "heldout": merged["heldout_pair"].to_numpy(bool),
        }
    by_type = {}
    if QUESTION_TYPE in merged:
        types = merged[QUESTION_TYPE].astype(str)
        by_type = {f"question_type={t}": (types == t).to_numpy() for t in sorted(types.unique())}
    rows = []
    for (modality, task), group in merged.groupby(["modality", "task"]):
        for subset, mask in (subsets | by_type).items():
            part = group[mask[group.index]]
            if part.empty:  # e.g. no held-out pair among the items scored
                continue
            for metric, column in metrics:
                values = part[column].to_numpy(float)
                low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
                rows.append(
                    {
                        "model": model,
                        "role": role,
                        "modality": modality,
                        "task": task,
                        "subset": subset,
                        "metric": metric,
                        "value": float(values.mean()),
                        "ci_low": float(low),
                        "ci_high": float(high),
                        "stderr": standard_error(values),
                        "n": len(values),
                        "seed": seed,
                    }
                )
    return pd.DataFrame(rows)


def majority_baseline(
    data: pd.DataFrame, modalities: list[str], model: str, role: str, seed: int, n_boot: int
) -> pd.DataFrame:
    """Chance as the benchmark itself sets it: the accuracy of always giving the most common
    answer of an item's question type (``labels.question_type``, else its task), in the same
    tidy rows as :func:`summarise` with metric ``majority_baseline``."""
    answers = data["answer"].map(normalise_answer)
    kind = data[QUESTION_TYPE] if QUESTION_TYPE in data else data.get("task", "all")
    mode = answers.groupby(pd.Series(kind, index=data.index)).transform(
        lambda group: group.value_counts().index[0]
    )
    scored = pd.concat(
        [pd.DataFrame({"id": data["id"], "modality": m, "correct": answers == mode})
         for m in modalities]
    )  # fmt: skip
    table = summarise(scored, data, model, role, seed, n_boot)
    return table.assign(metric="majority_baseline")


def score_model(
    loaded: LoadedModel,
    data: pd.DataFrame,
    modalities: list[str],
    *,
    seed: int = 0,
    n_boot: int = 1000,
    **score_kwargs,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``loaded`` in each prompt form: (tidy summary, per-sample rows).

    ``score_kwargs`` go to :func:`score_rows` (n_captions, batch_size, max_new_tokens,
    scoring_context)."""
    scored = pd.concat(
        [
            score_rows(loaded, data, m, desc=f"{loaded.spec.name} {m}", **score_kwargs)
            for m in modalities
        ]
    )
    table = summarise(scored, data, loaded.spec.name, loaded.spec.role, seed, n_boot)
    return table, scored


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name for the tables")
    add_spec_arguments(parser)
    parser.add_argument("--role", default="tuned", help="base | aligned | tuned | variant")
    parser.add_argument("--data", type=Path, required=True, help="benchmark dataset")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=["image", "text"],
        help="prompt forms to score (text-only models: text only)",
    )
    parser.add_argument("--n-captions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--limit", type=int, default=0, help="score only the first N rows")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | ...")
    parser.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="tidy Parquet to write")
    parser.add_argument("--predictions", type=Path, help="also write per-sample predictions")
    parser.add_argument(
        "--harness",
        choices=["lmms-eval", "plain"],
        default="lmms-eval",
        help="lmms-eval (the benchmark as lmms-eval tasks; see vlmlayers.harness) or the plain "
        "loop (same prompts and scoring, no lmms-eval import; adds answer log-probabilities)",
    )
    parser.add_argument(
        "--task-prefix", default="benchmark", help="lmms-eval task names: PREFIX_TASK[_text]"
    )
    parser.add_argument(
        "--lmms-tasks", nargs="*", default=[], help="also run these lmms-eval tasks (e.g. mmvp)"
    )
    parser.add_argument(
        "--include-path", type=Path, nargs="*", default=[], help="extra lmms-eval task folders"
    )
    parser.add_argument(
        "--tasks-dir", type=Path, help="keep the generated task YAML + data here (default: temp)"
    )
    parser.add_argument(
        "--captioning",
        action="store_true",
        help="lmms-eval: also caption the benchmark's distinct images, scored by CIDEr-D",
    )


def run(args: argparse.Namespace) -> None:
    from vlmlayers.runtime import resolve_dtype

    device = setup_torch(seed=args.seed)
    spec = ModelSpec.from_args(args, args.model, args.role)
    loaded = load(spec, device=device, dtype=resolve_dtype(args.dtype, device))
    modalities = args.modalities if loaded.is_multimodal else ["text"]
    data = read_dataset(args.data, args.on_bad_rows, needs_image="image" in modalities).frame
    if args.limit:
        data = data.head(args.limit)
    settings = {
        "seed": args.seed,
        "n_captions": args.n_captions,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.harness == "plain":
        table, scored = score_model(loaded, data, modalities, **settings)
    else:
        from vlmlayers import harness

        if args.lmms_tasks and not loaded.is_multimodal:
            print(f"{args.model} is text-only: skipping the image tasks {args.lmms_tasks}")
            args.lmms_tasks = []
        table, scored = harness.score_model(
            loaded,
            data,
            modalities,
            prefix=args.task_prefix,
            extra_tasks=args.lmms_tasks,
            include_path=args.include_path,
            tasks_dir=args.tasks_dir,
            captioning=args.captioning and "image" in modalities,
            limit=args.limit,
            **settings,
        )
    baseline = majority_baseline(data, modalities, args.model, loaded.spec.role, args.seed, 1000)
    table = pd.concat([table, baseline], ignore_index=True)
    write_parquet(table, args.out)
    if args.predictions:
        write_parquet(scored, args.predictions)
    shown = table[(table.metric == "accuracy") & (table.subset == "all")]
    print(shown[["model", "modality", "task", "value", "n"]].to_string(index=False))
