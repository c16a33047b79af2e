"""Benchmarks through lmms-eval: the same answers and scores as the plain loop, loud failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make setup installs it)")

from vlmlayers import evaluate, harness, intervene  # noqa: E402
from vlmlayers.cli import main  # noqa: E402
from vlmlayers.models import ModelSpec, load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BASE = ROOT / "models" / "tinyworld" / "base"
KEY = ["modality", "task", "subset", "metric"]


def both_ways(loaded, data, modalities, **kwargs):
    lmms_table, lmms_rows = harness.score_model(
        loaded, data, modalities, prefix="tinyworld", batch_size=8, **kwargs
    )
    plain_table, plain_rows = evaluate.score_model(loaded, data, modalities, batch_size=8)
    return lmms_table, lmms_rows, plain_table, plain_rows


def assert_same_scores(lmms_table, lmms_rows, plain_table, plain_rows):
    lmms_rows = lmms_rows[lmms_rows.modality != "caption"]
    lmms_table = lmms_table[lmms_table.task != "caption"]
    rows = lmms_rows.merge(plain_rows, on=["id", "modality"], suffixes=("_lmms", "_plain"))
    assert len(rows) == len(plain_rows) == len(lmms_rows)
    assert rows["prediction_lmms"].tolist() == rows["prediction_plain"].tolist()
    accuracy = plain_table[plain_table.metric == "accuracy"]
    both = lmms_table.merge(accuracy, on=KEY, suffixes=("_lmms", "_plain"))
    assert len(both) == len(accuracy)
    assert both["value_lmms"].tolist() == both["value_plain"].tolist()
    assert both["n_lmms"].tolist() == both["n_plain"].tolist()


@pytest.mark.parametrize("name", ["aligned", "tuned"])
def test_lmms_eval_answers_and_scores_equal_the_plain_loop(name, tiny_models, tiny_world):
    loaded = load(ModelSpec(name=name, path=str(tiny_models[name]), role=name))
    data = pd.read_parquet(tiny_world / "test.parquet")
    scores = both_ways(loaded, data, ["image", "text"], captioning=True)
    assert_same_scores(*scores)
    cider = scores[0].query("task == 'caption'")
    assert cider["metric"].tolist() == ["cider"] and cider["n"].item() == data["image"].nunique()
    captions = scores[1].query("modality == 'caption'")
    assert cider["value"].item() == pytest.approx(captions["cider"].mean())


def test_lmms_eval_scores_a_trained_model_like_the_plain_loop(tiny_world, tmp_path):
    """The shipped base LM answers text-form questions (not all-wrong, so equality means
    something); lmms-eval's own standard error equals the table's."""
    loaded = load(ModelSpec(name="base", path=str(SHIPPED_BASE), role="base"))
    data = pd.read_parquet(tiny_world / "test.parquet")
    lmms_table, lmms_rows, plain_table, plain_rows = both_ways(loaded, data, ["text"])
    assert_same_scores(lmms_table, lmms_rows, plain_table, plain_rows)
    overall = lmms_table.query("metric == 'accuracy' and subset == 'all'").set_index("task")
    assert overall.loc["knowledge", "value"] > 0.5 and overall.loc["vision", "value"] > 0.5
    model = harness.VlmlayersLMM(loaded=loaded, batch_size=8)
    names = harness.write_tasks(data, tmp_path, "tw", ["text"])
    results = harness.run_tasks(model, list(names), [tmp_path])
    for name, (task, _) in names.items():
        assert results["results"][name]["exact_match_stderr,none"] == pytest.approx(
            overall.loc[task, "stderr"], rel=1e-9
        )


def test_an_intervention_in_the_model_changes_the_score_as_it_does_itself(tiny_models, tiny_world):
    loaded = load(ModelSpec(name="tuned", path=str(tiny_models["tuned"])))
    data = pd.read_parquet(tiny_world / "test.parquet")
    blocks = range(0, loaded.n_layers)

    def knocked_out():
        return intervene.knockout(loaded, blocks, queries="text")

    lmms_table, lmms_rows = harness.score_model(
        loaded, data, ["image"], batch_size=8, intervention=knocked_out
    )
    with knocked_out():
        plain_table, plain_rows = evaluate.score_model(loaded, data, ["image"], batch_size=8)
    assert_same_scores(lmms_table, lmms_rows, plain_table, plain_rows)
    _, intact = harness.score_model(loaded, data, ["image"], batch_size=8)
    changed = (intact["prediction"] != lmms_rows["prediction"]).sum()
    assert changed > 0, "knocking out every block's image attention changed no answer"


def test_broken_task_file_and_missing_data_fail_naming_them(tiny_models, tiny_world, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mybench.yaml").write_text("task: mybench\ndataset_path: [unclosed\n")
    args = [
        "evaluate",
        "--model",
        "tuned",
        "--path",
        str(tiny_models["tuned"]),
        "--data",
        str(tiny_world / "test.parquet"),
        "--out",
        str(tmp_path / "eval.parquet"),
    ]
    with pytest.raises(RuntimeError, match="mybench.yaml"):
        main([*args, "--lmms-tasks", "mybench", "--include-path", str(tasks)])
    assert not (tmp_path / "eval.parquet").exists()
    spec = {
        "include": str(harness.TASK_TEMPLATES / "_vlmlayers_image.yaml"),
        "task": "mybench",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "absent.parquet")}},
    }
    (tasks / "mybench.yaml").write_text(json.dumps(spec))
    with pytest.raises(Exception, match="absent.parquet"):
        main([*args, "--lmms-tasks", "mybench", "--include-path", str(tasks)])
    assert not (tmp_path / "eval.parquet").exists()
    missing = tmp_path / "gone.parquet"
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        main([*args[:-4], "--data", str(missing), "--out", str(tmp_path / "eval.parquet")])


def test_incomplete_results_are_an_error():
    results = {
        "results": {"t": {"exact_match,none": 0.5}},
        "n-samples": {"t": {"effective": 4}},
        "samples": {"t": [{}, {}, {}]},
    }
    with pytest.raises(RuntimeError, match=r"'t' has 3 of 4 samples"):
        harness.check_complete(results, ["t"])
    with pytest.raises(RuntimeError, match="'u' has no results"):
        harness.check_complete(results, ["u"])
    results["samples"]["t"].append({})
    harness.check_complete(results, ["t"])


def test_lmms_eval_cli_finds_the_vlmlayers_model(tiny_models, tiny_world, tmp_path):
    """The entry point registers ``--model vlmlayers``; the written tasks run from the CLI."""
    data = pd.read_parquet(tiny_world / "test.parquet")
    harness.write_tasks(data, tmp_path / "tasks", "tinyworld", ["image", "text"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "vlmlayers",
            "--model_args",
            f"pretrained={tiny_models['tuned']},knockout=0-1",
            "--batch_size",
            "8",
            "--include_path",
            str(tmp_path / "tasks"),
            "--tasks",
            "tinyworld,tinyworld_text",
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    written = list((tmp_path / "out").rglob("*_results.json"))
    assert written, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(written[0].read_text())["results"]
    assert {"tinyworld_vision", "tinyworld_knowledge_text"} <= set(results)
    assert results["tinyworld_vision_text"]["exact_match,none"] >= 0.0


def test_the_paper_config_names_tasks_lmms_eval_knows():
    from lmms_eval.tasks import TaskManager

    from vlmlayers import config

    named = config.load(ROOT / "config" / "paper.yaml")["evaluate"]["lmms_tasks"]
    assert {"mmvp", "cv_bench", "realworldqa", "pope"} <= set(named)
    known = set(TaskManager(include_defaults=True).all_tasks)
    assert set(named) <= known, sorted(set(named) - known)


def test_captions_are_scored_by_cider_against_the_references(tiny_world, tmp_path):
    """Each distinct image once, the captioning prompt with no prefilled reply, CIDEr-D per image
    equal to pycocoevalcap's on the same words; a reference caption scores high, an empty one 0."""
    data = pd.read_parquet(tiny_world / "test.parquet")
    names = harness.write_tasks(data, tmp_path, "tw", ["image"], captioning=True)
    assert names["tw_caption"] == ("caption", "caption")
    rows = pd.read_parquet(tmp_path / "tw_caption.parquet")
    assert len(rows) == data["image"].nunique() and rows["id"].is_unique
    refs = [list(c) for c in rows["captions"]]
    own = evaluate.cider([r[0] for r in refs], refs)
    assert (own > 1.0).all()
    assert evaluate.cider(["", *[r[0] for r in refs[1:]]], refs)[0] == 0.0
    assert evaluate.caption_words("Three small, yellow circles .") == "three small yellow circles"


def test_loglikelihood_is_the_reply_logprob_and_knows_the_greedy_answer(tiny_models, tiny_world):
    from lmms_eval.api.instance import Instance

    from vlmlayers import prompts

    loaded = load(ModelSpec(name="tuned", path=str(tiny_models["tuned"])))
    rows = pd.read_parquet(tiny_world / "test.parquet").head(3)
    model = harness.VlmlayersLMM(loaded=loaded, batch_size=8)
    model.task_dict = {"t": {"test": rows.to_dict("records")}}
    greedy = evaluate.generate_answers(loaded, prompts.encode_rows(loaded, rows, "image", 2), 5)

    def request(question, reply, doc_id):
        arguments = (prompts.image_prompt(question), reply, _image, doc_id, "t", "test")
        meta = {"task": "t", "doc_id": doc_id, "repeats": 1}
        return Instance("loglikelihood", arguments, idx=0, metadata=meta)

    pairs = zip(rows["question"], rows["answer"], strict=True)
    requests = [request(q, a, i) for i, (q, a) in enumerate(pairs)]
    requests.append(request(rows["question"].iloc[0], greedy[0], 0))
    scores = model.loglikelihood(requests)
    batch = prompts.encode_rows(loaded, rows, "image", 2, rows["answer"].tolist())
    expected = evaluate.answer_logprob(loaded, dict(batch))
    assert [s for s, _ in scores[:3]] == pytest.approx(expected.tolist(), rel=1e-5)
    if greedy[0]:  # the model's own greedy answer is greedy by construction
        assert scores[3][1] is True


def _image(doc):
    from vlmlayers.data import image_of

    return [image_of(doc)]
