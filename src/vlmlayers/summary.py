"""Tables for the report: benchmark scores per model and prompt form, captioning, accuracy per
question type, and the selective fine-tuning learning curves (accuracy by step and training
seconds, both forms).

Reads the tidy tables of ``vlmlayers evaluate`` (``--eval``) and ``vlmlayers finetune table``
(``--finetune``); writes one Markdown file. Cells are ``value [ci_low, ci_high]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from vlmlayers.claims import model_order, model_roles, parse_roles, read_tables
from vlmlayers.io import atomic_path


def _cell(value: float, low: float, high: float) -> str:
    if pd.isna(low) or pd.isna(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def benchmark_table(scores: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per model: accuracy per task and prompt form (subset "all") and CIDEr-D."""
    rows = scores[scores["subset"] == "all"].copy()
    rows = rows[(rows["metric"] == "accuracy") | (rows["metric"] == "cider")]
    rows["column"] = [
        "captioning CIDEr-D" if m == "cider" else f"{t} ({f} form)"
        for m, t, f in zip(rows["metric"], rows["task"], rows["modality"], strict=True)
    ]
    rows["cell"] = [
        _cell(v, lo, hi)
        for v, lo, hi in zip(rows["value"], rows["ci_low"], rows["ci_high"], strict=True)
    ]
    table = rows.pivot_table(index="model", columns="column", values="cell", aggfunc="first")
    order = model_order(model_roles(scores, roles))
    return table.reindex([m for m in order if m in table.index]).fillna("")


def question_type_table(scores: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Accuracy per question type (the ``question_type=<type>`` subsets): one row per model and
    prompt form, one column per type (tasks side by side), value with its item count."""
    prefix = "question_type="
    typed = scores[scores["subset"].str.startswith(prefix)]
    rows = typed[typed["metric"] == "accuracy"]
    if rows.empty:
        return pd.DataFrame()
    # chance as the benchmark sets it (always the commonest answer of the type), shown once
    chance = typed[typed["metric"] == "majority_baseline"].drop_duplicates(["task", "subset"])
    rows = pd.concat([rows, chance.assign(model=MAJORITY, modality="any")], ignore_index=True)
    rows = rows.assign(
        type=[
            f"{t}: {s[len(prefix) :]}" for t, s in zip(rows["task"], rows["subset"], strict=True)
        ],
        cell=[f"{v:.3f} ({n})" for v, n in zip(rows["value"], rows["n"], strict=True)],
        form=rows["modality"] + " form",
    )
    table = rows.pivot_table(
        index=["model", "form"], columns="type", values="cell", aggfunc="first"
    )
    order = [*model_order(model_roles(scores, roles)), MAJORITY]
    forms = ("image form", "text form", "any form")
    keep = [(m, f) for m in order for f in forms if (m, f) in table.index]
    return table.reindex(keep).fillna("")


MAJORITY = "(majority answer)"


def curve_table(finetune: pd.DataFrame, start: pd.DataFrame | None = None) -> pd.DataFrame:
    """Learning curves: mean accuracy over seeds per variant x step and prompt form (all tasks
    pooled by their item counts), with the mean training seconds to that step; step 0 is the
    ``start`` model's evaluation (the aligned VLM every variant is tuned from) when given."""
    rows = finetune[(finetune["comparison"] == "curve") & (finetune["subset"] == "all")].copy()
    if start is not None and not start.empty:
        first = start[(start["metric"] == "accuracy") & (start["subset"] == "all")]
        rows = pd.concat(
            [
                rows,
                first.rename(columns={"value": "accuracy"}).assign(
                    variant=f"(start: {first['model'].iloc[0]})", seed=0, step=0, train_seconds=0.0
                ),
            ],
            ignore_index=True,
        )
    rows["correct"] = rows["accuracy"] * rows["n"]
    per_run = rows.groupby(["variant", "seed", "step", "modality"], as_index=False).agg(
        correct=("correct", "sum"), n=("n", "sum"), seconds=("train_seconds", "first")
    )
    per_run["accuracy"] = per_run["correct"] / per_run["n"]
    mean = per_run.groupby(["variant", "step", "modality"], as_index=False).agg(
        accuracy=("accuracy", "mean"), seconds=("seconds", "mean")
    )
    table = mean.pivot_table(
        index=["variant", "step"], columns="modality", values="accuracy"
    ).rename(columns=lambda m: f"accuracy ({m} form)")
    seconds = mean.groupby(["variant", "step"])["seconds"].first().rename("training seconds")
    return table.join(seconds).round(3).reset_index()


def to_markdown(
    benchmarks: pd.DataFrame | None,
    curves: pd.DataFrame | None,
    question_types: pd.DataFrame | None = None,
) -> str:
    lines = ["# Benchmarks and learning curves", ""]
    if benchmarks is not None and not benchmarks.empty:
        lines += [
            "## Benchmark scores",
            "",
            "Accuracy by exact match after normalisation, per task and prompt form (image + "
            "question; captions + the same question), and captioning CIDEr-D of the benchmark's "
            "images against its captions; 95% bootstrap CIs.",
            "",
            benchmarks.to_markdown(),
            "",
        ]
    if question_types is not None and not question_types.empty:
        lines += [
            "## Accuracy by question type",
            "",
            "Exact-match accuracy per task and question type (`labels.question_type`), per model "
            "and prompt form; the number of items in parentheses. The last row is chance as the "
            "benchmark sets it: always the commonest answer of the question type.",
            "",
            question_types.to_markdown(),
            "",
        ]
    if curves is not None and not curves.empty:
        lines += [
            "## Selective fine-tuning: learning curves",
            "",
            "Accuracy over the benchmark (all tasks) at each saved step, mean over seeds, in both "
            "prompt forms, with the training seconds spent to reach that step; step 0 is the "
            "aligned model every variant starts from.",
            "",
            curves.to_markdown(index=False),
            "",
        ]
    if len(lines) == 2:
        lines += ["No benchmark or fine-tuning table was given.", ""]
    return "\n".join(lines)


def _start(scores: pd.DataFrame | None, roles: dict[str, str]) -> pd.DataFrame | None:
    """The aligned model's scores (where selective fine-tuning starts), if evaluated."""
    if scores is None:
        return None
    aligned = [m for m, r in model_roles(scores, roles).items() if r == "aligned"]
    return scores[scores["model"] == aligned[0]] if aligned else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval", nargs="*", default=[], help="vlmlayers evaluate tables")
    parser.add_argument("--finetune", nargs="*", default=[], help="vlmlayers finetune table")
    parser.add_argument("--roles", nargs="*", help="NAME=ROLE overrides (model order)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")


def run(args: argparse.Namespace) -> None:
    scores = read_tables(args.eval)
    finetune = read_tables(args.finetune)
    roles = parse_roles(args.roles)
    text = to_markdown(
        benchmark_table(scores, roles) if scores is not None else None,
        curve_table(finetune, _start(scores, roles))
        if finetune is not None and "comparison" in finetune
        else None,
        question_type_table(scores, roles) if scores is not None else None,
    )
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(text)
    print(text)
