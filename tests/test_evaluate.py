"""Scoring rules and the evaluation loop."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from vlmlayers import evaluate, prompts
from vlmlayers.cli import main
from vlmlayers.models import ModelSpec, load


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Red", "red", True),
        ("red.", "red", True),
        ("the red", "red", True),
        ("two", "2", True),
        ("", "red", False),
        (None, "red", False),
        ("red circle", "red", False),  # no substring matching
        ("re", "red", False),
        ("  ", "", False),  # an empty prediction never scores
    ],
)
def test_exact_match_after_normalisation(prediction, answer, expected):
    assert evaluate.exact_match(prediction, answer) is expected


def test_answer_logprob_is_the_sum_over_answer_tokens(tiny_models, tiny_world):
    loaded = load(ModelSpec(name="tuned", path=str(tiny_models["tuned"])))
    rows = pd.read_parquet(tiny_world / "test.parquet").head(3)
    batch = prompts.encode_rows(loaded, rows, "image", 2, rows["answer"].tolist())
    got = evaluate.answer_logprob(loaded, dict(batch))
    with torch.no_grad():
        logits = loaded.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for i, answer in enumerate(rows["answer"]):
        answer_id = loaded.tokenizer.convert_tokens_to_ids(answer)
        position = (batch["labels"][i] == answer_id).nonzero()[0, 0]  # single-token answers
        expected = torch.log_softmax(logits[i, position - 1], -1)[answer_id]
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-5)


def test_evaluate_cli_writes_tidy_table(tiny_models, tiny_world, tmp_path):
    out, predictions = tmp_path / "eval.parquet", tmp_path / "pred.parquet"
    main(
        [
            "evaluate",
            "--model",
            "tuned",
            "--path",
            str(tiny_models["tuned"]),
            "--role",
            "tuned",
            "--data",
            str(tiny_world / "test.parquet"),
            "--out",
            str(out),
            "--predictions",
            str(predictions),
            "--max-new-tokens",
            "2",
        ]
    )
    table = pd.read_parquet(out)
    assert {
        "model",
        "role",
        "modality",
        "task",
        "subset",
        "metric",
        "value",
        "ci_low",
        "ci_high",
        "n",
        "seed",
    } <= set(table.columns)
    assert set(table["modality"]) == {"image", "text"}
    assert set(table["task"]) == {"vision", "knowledge"}
    scored = pd.read_parquet(predictions)
    assert len(scored) == 2 * 32
    data = pd.read_parquet(tiny_world / "test.parquet")
    accuracy = table.query("metric == 'accuracy' and subset == 'all'")
    for (modality, task), value in accuracy.set_index(["modality", "task"])["value"].items():
        ids = set(data.loc[data["task"] == task, "id"])
        part = scored[(scored["modality"] == modality) & scored["id"].isin(ids)]
        assert value == pytest.approx(part["correct"].mean())
    # one row per question type, within its task, equal to the predictions' mean
    typed = table.query("metric == 'accuracy' and subset.str.startswith('question_type=')")
    assert len(typed) == 2 * data["labels.question_type"].nunique()
    for _, row in typed.iterrows():
        kind = row["subset"].split("=", 1)[1]
        ids = set(data.loc[data["labels.question_type"] == kind, "id"])
        assert (data.loc[data["id"].isin(ids), "task"] == row["task"]).all()
        part = scored[(scored["modality"] == row["modality"]) & scored["id"].isin(ids)]
        assert row["value"] == pytest.approx(part["correct"].mean()) and row["n"] == len(ids)
    # chance: always the commonest answer of the item's question type
    chance = table.query("metric == 'majority_baseline' and subset == 'all' and modality == 'text'")
    commonest = data.groupby("labels.question_type")["answer"].transform(
        lambda a: a.value_counts().index[0]
    )
    hits = (data["answer"] == commonest).groupby(data["task"]).mean()
    assert chance.set_index("task")["value"].to_dict() == pytest.approx(hits.to_dict())


def test_text_only_model_is_scored_in_text_form(tiny_models, tiny_world, tmp_path):
    out = tmp_path / "base.parquet"
    main(
        [
            "evaluate",
            "--model",
            "base",
            "--path",
            str(tiny_models["base"]),
            "--role",
            "base",
            "--data",
            str(tiny_world / "test.parquet"),
            "--out",
            str(out),
            "--limit",
            "8",
        ]
    )
    assert set(pd.read_parquet(out)["modality"]) == {"text"}
