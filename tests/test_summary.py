"""Report tables: benchmark scores per model and form, learning curves with the aligned start."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmlayers import summary
from vlmlayers.cli import main


def eval_rows(model, role, accuracy, cider=None):
    rows = [
        {"model": model, "role": role, "modality": form, "task": task, "subset": subset,
         "metric": "accuracy", "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1,
         "n": n}
        for (form, task, n), value in accuracy.items()
        for subset in ("all", "seen")
    ]  # fmt: skip
    if cider is not None:
        rows.append(
            {"model": model, "role": role, "modality": "image", "task": "caption", "subset": "all",
             "metric": "cider", "value": cider, "ci_low": 0.0, "ci_high": 2.0, "n": 10}
        )  # fmt: skip
    return pd.DataFrame(rows)


def curve_rows(variant, seed, step, seconds, accuracy):
    return [
        {"variant": variant, "seed": seed, "step": step, "train_seconds": seconds,
         "comparison": "curve", "subset": "all", "modality": form, "task": task,
         "accuracy": value, "n": n}
        for (form, task, n), value in accuracy.items()
    ]  # fmt: skip


def test_benchmark_table_has_both_forms_and_captioning_in_role_order():
    scores = pd.concat(
        [
            eval_rows(
                "tuned", "tuned", {("image", "vision", 30): 0.7, ("text", "vision", 30): 0.6}, 0.5
            ),
            eval_rows("base", "base", {("text", "vision", 30): 0.9}),
        ]
    )  # fmt: skip
    table = summary.benchmark_table(scores)
    assert table.index.tolist() == ["base", "tuned"]
    assert table.loc["tuned", "vision (image form)"] == "0.700 [0.600, 0.800]"
    assert table.loc["tuned", "captioning CIDEr-D"] == "0.500 [0.000, 2.000]"
    assert table.loc["base", "vision (image form)"] == ""


def test_curves_pool_tasks_by_items_average_seeds_and_start_at_the_aligned_model(tmp_path):
    accuracy = {("image", "vision", 30): 0.6, ("image", "knowledge", 10): 1.0}
    worse = {("image", "vision", 30): 0.4, ("image", "knowledge", 10): 0.0}
    finetune = pd.DataFrame(
        curve_rows("middle", 0, 5, 10.0, accuracy)
        + curve_rows("middle", 1, 5, 12.0, worse)
        + [{**r, "comparison": "equal_steps"} for r in curve_rows("middle", 0, 5, 10.0, accuracy)]
    )  # fmt: skip
    start = eval_rows(
        "aligned", "aligned", {("image", "vision", 30): 0.2, ("image", "knowledge", 10): 0.6}
    )
    table = summary.curve_table(finetune, start).set_index("variant")
    # seed 0: (0.6*30 + 1.0*10) / 40 = 0.7; seed 1: 0.3; mean 0.5; seconds mean 11
    assert table.loc["middle", "accuracy (image form)"] == pytest.approx(0.5)
    assert table.loc["middle", "training seconds"] == pytest.approx(11.0)
    assert table.loc["(start: aligned)", "step"] == 0
    assert table.loc["(start: aligned)", "accuracy (image form)"] == pytest.approx(0.3)

    paths = []
    for name, frame in (("aligned", start), ("ft", finetune)):
        paths.append(tmp_path / f"{name}.parquet")
        frame.to_parquet(paths[-1])
    out = tmp_path / "summary.md"
    main(["summary", "--eval", str(paths[0]), "--finetune", str(paths[1]), "--out", str(out)])
    text = out.read_text()
    assert "## Benchmark scores" in text and "## Selective fine-tuning: learning curves" in text
    assert "| (start: aligned) |" in text


def test_question_type_table_has_every_type_and_the_majority_answer():
    rows = []
    for model, value in (("tuned", 0.8), ("base", 0.6)):
        forms = ("text",) if model == "base" else ("image", "text")
        for form in forms:
            for task, kind in (("vision", "colour"), ("vision", "count"), ("knowledge", "owner")):
                rows.append(
                    {
                        "model": model,
                        "role": model,
                        "modality": form,
                        "task": task,
                        "subset": f"question_type={kind}",
                        "metric": "accuracy",
                        "value": value,
                        "ci_low": 0.0,
                        "ci_high": 1.0,
                        "n": 10,
                    }
                )
                rows.append({**rows[-1], "metric": "majority_baseline", "value": 0.25})
    rows.append({**rows[0], "subset": "all", "value": 0.1})  # not a question type
    table = summary.question_type_table(pd.DataFrame(rows))
    assert table.index.tolist() == [
        ("base", "text form"), ("tuned", "image form"), ("tuned", "text form"),
        (summary.MAJORITY, "any form"),
    ]  # fmt: skip
    assert list(table.columns) == ["knowledge: owner", "vision: colour", "vision: count"]
    assert table.loc[("tuned", "image form"), "vision: colour"] == "0.800 (10)"
    assert table.loc[(summary.MAJORITY, "any form"), "knowledge: owner"] == "0.250 (10)"
