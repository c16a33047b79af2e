"""Benchmarks through lmms-eval (Zhang et al. 2024, "LMMs-Eval"): the ``vlmlayers`` model and
the contract benchmark's tasks.

``VlmlayersLMM`` is one lmms-eval model for every checkpoint the pipeline loads (any family in
``vlmlayers.models``), asked with the family's chat template through ``vlmlayers.prompts``; an
optional intervention (knockout window, transplant, ...) is active during every forward. It is
registered under the ``lmms_eval.models`` entry point as ``vlmlayers``::

    lmms-eval --model vlmlayers --model_args pretrained=results/models/tuned \\
        --include_path results/eval/tasks --tasks tinyworld

A contract benchmark (``vlmlayers.data``) becomes one task per ``task`` value and prompt form:
``{prefix}_{task}`` (image + question) and ``{prefix}_{task}_text`` (captions + question), in
groups ``{prefix}`` and ``{prefix}_text``. Their YAML includes this package's
``lmms_tasks/_vlmlayers_{image,text}.yaml``; :func:`write_tasks` writes them, one Parquet per task.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import yaml
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from vlmlayers import evaluate, intervene, prompts
from vlmlayers.io import write_parquet
from vlmlayers.models import LoadedModel, ModelSpec, load
from vlmlayers.runtime import resolve_dtype, setup_torch
from vlmlayers.stats import bootstrap_ci

TASK_TEMPLATES = Path(__file__).with_name("lmms_tasks")
FORMS = {"image": "", "text": "_text"}  # prompt form -> task-name suffix
METRIC = "exact_match"


def manifest():
    """The ``lmms_eval.models`` entry point: ``--model vlmlayers`` is :class:`VlmlayersLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmlayers", simple_class_path="vlmlayers.harness.VlmlayersLMM")


class VlmlayersLMM(lmms):
    """Any vlmlayers checkpoint as an lmms-eval model (greedy answers, log-likelihoods).

    Built from ``pretrained`` (a spec path) by lmms-eval, or around an already ``loaded`` model
    in-process. ``intervention`` is a context-manager factory entered around every forward
    (e.g. ``lambda: intervene.knockout(loaded, range(2, 4))``); from lmms-eval's
    ``--model_args``, ``knockout=2-3[,queries=last]`` or ``transplant=2-3,donor=PATH`` (inclusive
    decoder-block windows, as ``vlmlayers intervene``). The assistant turn is prefilled with
    ``prefill`` ("Answer:", the study's convention; "" for none). Batch size: lmms-eval's
    ``--batch_size``."""

    def __init__(
        self,
        pretrained: str | None = None,
        family: str | None = None,
        revision: str | None = None,
        name: str | None = None,
        role: str = "tuned",
        dtype: str = "auto",
        batch_size: int | str = 16,
        prefill: str = prompts.ANSWER_PREFIX,
        trust_remote_code: bool = False,
        loaded: LoadedModel | None = None,
        intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
        knockout: str | None = None,
        queries: str = "text",
        transplant: str | None = None,
        donor: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if loaded is None:
            if not pretrained:
                raise ValueError(
                    "vlmlayers model: give pretrained=<checkpoint directory or hub id>"
                )
            device = setup_torch(seed=0)
            spec = ModelSpec(
                name=name or Path(pretrained).name,
                path=pretrained,
                role=role,
                family=family,
                revision=revision,
                dtype=dtype,
                trust_remote_code=str(trust_remote_code).lower() == "true",
            )
            loaded = load(spec, device=device, dtype=resolve_dtype(dtype, device))
        self.loaded = loaded
        if knockout is not None:
            blocks = _window(knockout)
            intervention = partial(intervene.knockout, loaded, blocks, queries)
        elif transplant is not None:
            if not donor:
                raise ValueError("vlmlayers model: transplant=... needs donor=<checkpoint>")
            blocks = _window(transplant)
            donor_model = load(
                ModelSpec(name="donor", path=donor, dtype=dtype),
                device=loaded.device,
                dtype=loaded.model.dtype,
            )
            intervention = partial(intervene.transplant, loaded, donor_model, blocks)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.prefill = prefill or None
        self.intervention = intervention or contextlib.nullcontext
        self.task_dict: dict = {}

    def _doc(self, request: Instance) -> dict:
        *_, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _encode(
        self,
        contexts: list[str],
        visuals: list[list],
        replies: list[str] | None = None,
        prefill: str | None = None,
    ):
        conversations = [
            prompts.chat(c, n_images=len(v), prefill=prefill)
            for c, v in zip(contexts, visuals, strict=True)
        ]
        images = visuals if visuals[0] else None
        return prompts.encode(self.loaded.processor, conversations, images, replies).to(
            self.loaded.device
        )

    def _batches(self, keys: list) -> Iterable[list[int]]:
        """Request indices in batches of equal key (with or without images, same settings)."""
        groups: dict = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        visuals = [self._visuals(r) for r in requests]
        keys = [
            (bool(v), repr(sorted(r.args[1].items())))
            for r, v in zip(requests, visuals, strict=True)
        ]
        bar = tqdm(total=len(requests), desc=f"lmms-eval {self.loaded.spec.name}", unit="item")
        for indices in self._batches(keys):
            settings = dict(requests[indices[0]].args[1])
            until = settings.get("until") or []
            prefill = settings.get("prefill", self.prefill)  # a task may ask for none ("")
            batch = self._encode(
                [requests[i].args[0] for i in indices],
                [visuals[i] for i in indices],
                prefill=prefill or None,
            )
            with self.intervention():
                texts = evaluate.generate_answers(
                    self.loaded,
                    batch,
                    int(settings.get("max_new_tokens", 32)),
                    tuple([until] if isinstance(until, str) else until),
                )
            for i, text in zip(indices, texts, strict=True):
                answers[i] = text
            bar.update(len(indices))
        bar.close()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        visuals = [self._visuals(r) for r in requests]
        for indices in self._batches([bool(v) for v in visuals]):
            chosen = [requests[i] for i in indices]
            targets = [
                t if isinstance(t, str) else t(self._doc(r))
                for r, t in ((r, r.args[1]) for r in chosen)
            ]
            batch = self._encode(
                [r.args[0] for r in chosen], [visuals[i] for i in indices], targets, self.prefill
            )
            with self.intervention():
                logprob, greedy = evaluate.reply_scores(self.loaded, batch)
            for j, i in enumerate(indices):
                out[i] = (float(logprob[j]), bool(greedy[j]))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlmlayers: multi-round generation is not supported")

    def _visuals(self, request: Instance) -> list:
        doc_to_visual = request.args[2]
        found = doc_to_visual(self._doc(request)) if doc_to_visual else []
        return [v for v in (found or []) if v is not None]


def _window(text: str) -> range:
    """ "2-3" -> blocks 2..3 (inclusive), "4" -> block 4."""
    start, _, end = str(text).partition("-")
    return range(int(start), int(end or start) + 1)


# ---------------------------------------------------------------------------------------------
# Contract benchmarks as lmms-eval tasks


def task_name(prefix: str, task: str, form: str) -> str:
    return f"{prefix}_{task}{FORMS[form]}"


def write_tasks(
    data: pd.DataFrame,
    out: Path,
    prefix: str,
    forms: list[str],
    n_captions: int = 2,
    max_new_tokens: int = 5,
    captioning: bool = False,
) -> dict[str, tuple[str, str]]:
    """One YAML + one Parquet per task x form of ``data`` in ``out``, groups ``prefix`` and
    ``prefix_text``; with ``captioning``, also ``prefix_caption`` over the distinct images.

    Returns {lmms-eval task name: (task, form)}, form "caption" for the captioning task."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = sorted(data["task"].unique()) if "task" in data else ["all"]
    names: dict[str, tuple[str, str]] = {}
    for task in tasks:
        rows = data[data["task"] == task] if "task" in data else data
        data_file = (out / f"{prefix}_{task}.parquet").resolve()
        write_parquet(rows.reset_index(drop=True), data_file)
        for form in forms:
            name = task_name(prefix, task, form)
            spec = {
                "include": str(TASK_TEMPLATES / f"_vlmlayers_{form}.yaml"),
                "task": name,
                "dataset_kwargs": {"data_files": {"test": str(data_file)}},
                "lmms_eval_specific_kwargs": {"default": {"n_captions": n_captions}},
                "generation_kwargs": {
                    "until": list(evaluate.ANSWER_STOPS),
                    "max_new_tokens": max_new_tokens,
                    "do_sample": False,
                },
            }
            (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            names[name] = (task, form)
    if captioning and "image" in forms:
        images = data.drop_duplicates(subset=[_image_key(data)])
        references = [prompts.captions_of(row) for _, row in images.iterrows()]
        rows = images.filter(["id", "image", "image_path"]).assign(captions=references)
        data_file = (out / f"{prefix}_caption.parquet").resolve()
        write_parquet(rows.reset_index(drop=True), data_file)
        name = f"{prefix}_caption"
        spec = {
            "include": str(TASK_TEMPLATES / "_vlmlayers_caption.yaml"),
            "task": name,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        }
        (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names[name] = ("caption", "caption")
    for form in forms:  # one group per form: prefix (image), prefix_text
        group = {
            "group": f"{prefix}{FORMS[form]}",
            "task": [name for name, (_, f) in names.items() if f == form],
            "aggregate_metric_list": [{"metric": METRIC, "weight_by_size": True}],
        }
        (out / f"{group['group']}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return names


def _image_key(data: pd.DataFrame) -> str:
    """The column that identifies an image: its path, else its bytes."""
    return "image_path" if "image_path" in data and "image" not in data else "image"


def run_tasks(
    model: VlmlayersLMM,
    tasks: list[str],
    include_path: list[Path],
    *,
    include_defaults: bool = False,
    limit: int | None = None,
    seed: int = 0,
) -> dict:
    """lmms-eval's ``simple_evaluate`` on ``tasks``; fails when a task has no or partial results."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    try:
        manager = TaskManager(
            include_path=[str(p) for p in include_path], include_defaults=include_defaults
        )
    except yaml.YAMLError as error:
        raise RuntimeError(f"an lmms-eval task file does not parse: {error}") from error
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise RuntimeError(
            f"lmms-eval does not know task(s) {unknown}: check the task YAML files under "
            f"{[str(p) for p in include_path]} (a file that does not parse is skipped)"
        )
    for task in tasks:
        _check_local_data(task, manager.task_index[task].get("yaml_path"))
    results = simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=manager,
        limit=limit or None,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
    check_complete(results, tasks)
    return results


def _check_local_data(task: str, yaml_path: str | None) -> None:
    """A task reading local files (``dataset_kwargs.data_files``) fails now, naming the file."""
    if not yaml_path or not Path(yaml_path).is_file():
        return
    from lmms_eval.utils import load_yaml_config

    files = (load_yaml_config(yaml_path, mode="simple").get("dataset_kwargs") or {}).get(
        "data_files"
    )
    listed = files.values() if isinstance(files, dict) else [files] if files else []
    for entry in listed:
        for path in [entry] if isinstance(entry, str) else entry:
            if "://" not in path and not Path(path).exists():
                raise FileNotFoundError(f"lmms-eval task {task!r} ({yaml_path}): no file {path}")


def leaf_tasks(results: dict, tasks: list[str]) -> list[str]:
    """``tasks`` with every group replaced by its (sub)tasks."""
    groups = results.get("group_subtasks", {})
    return [
        leaf for t in tasks for leaf in (leaf_tasks(results, groups[t]) if groups.get(t) else [t])
    ]


def check_complete(results: dict | None, tasks: list[str]) -> None:
    """Raise, naming the task, unless every task has its metric over every selected item."""
    if not results or "results" not in results:
        raise RuntimeError(f"lmms-eval returned no results for {tasks}")
    for task in leaf_tasks(results, tasks):
        scores = results["results"].get(task)
        if scores is None:
            raise RuntimeError(f"lmms-eval: task {task!r} has no results")
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        samples = results.get("samples", {}).get(task, [])
        if not samples or (n is not None and len(samples) != n):
            raise RuntimeError(f"lmms-eval: task {task!r} has {len(samples)} of {n} samples")
        metrics = [k for k, v in scores.items() if "," in k and "_stderr" not in k]
        if not metrics or all(_number(scores[k]) != _number(scores[k]) for k in metrics):
            raise RuntimeError(f"lmms-eval: task {task!r} has no score: {scores}")


def score_model(
    loaded: LoadedModel,
    data: pd.DataFrame,
    modalities: list[str],
    *,
    prefix: str = "benchmark",
    extra_tasks: list[str] = (),
    include_path: list[Path] = (),
    tasks_dir: Path | None = None,
    intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
    n_captions: int = 2,
    batch_size: int = 16,
    max_new_tokens: int = 5,
    captioning: bool = False,
    limit: int = 0,
    seed: int = 0,
    n_boot: int = 1000,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`vlmlayers.evaluate.score_model` through lmms-eval: the contract benchmark ``data``
    in each prompt form, plus lmms-eval's own ``extra_tasks`` (image form, their metrics; at most
    ``limit`` items each) and, with ``captioning``, CIDEr of captions for its distinct images
    (task "caption", metric "cider"). One ``simple_evaluate`` call for all of them. Returns the
    same tidy table (model, role, modality, task, subset, metric, value, ci_low, ci_high,
    stderr, n, seed) and per-sample rows (id, modality, prediction, correct; captions have
    modality "caption" and their CIDEr-D in ``cider``)."""
    model = VlmlayersLMM(loaded=loaded, batch_size=batch_size, intervention=intervention)
    with contextlib.ExitStack() as stack:
        if tasks_dir is None:
            tasks_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tasks-")))
        names = write_tasks(
            data, tasks_dir, prefix, modalities, n_captions, max_new_tokens, captioning
        )
        results = run_tasks(
            model,
            [*names, *extra_tasks],
            [tasks_dir, *include_path],
            include_defaults=bool(extra_tasks),
            limit=limit,
            seed=seed,
        )
    answers = [name for name, (_, form) in names.items() if form != "caption"]
    scored = pd.DataFrame(
        [
            {
                "id": sample["doc"]["id"],
                "modality": names[task][1],
                "prediction": sample["filtered_resps"][0],
                "correct": float(sample[METRIC]) == 1.0,
            }
            for task in answers
            for sample in results["samples"][task]
        ]
    )
    spec = loaded.spec
    table = evaluate.summarise(scored, data, spec.name, spec.role, seed, n_boot)
    captions = [name for name in names if name not in answers]
    if captions:
        samples = results["samples"][captions[0]]
        captioned = pd.DataFrame(
            {
                "id": [s["doc"]["id"] for s in samples],
                "modality": "caption",
                "prediction": [s["filtered_resps"][0] for s in samples],
                "cider": evaluate.cider(
                    [s["filtered_resps"][0] for s in samples],
                    [list(s["doc"]["captions"]) for s in samples],
                ),
            }
        )
        scored = pd.concat([scored, captioned], ignore_index=True)
        table = pd.concat(
            [table, _caption_row(captioned["cider"].to_numpy(), spec, seed, n_boot)],
            ignore_index=True,
        )
    extra = [
        {
            "model": spec.name,
            "role": spec.role,
            "modality": "image",
            "task": task,
            "subset": "all",
            "metric": key.split(",")[0],
            "value": float(value),
            "ci_low": math.nan,
            "ci_high": math.nan,
            "stderr": _number(results["results"][task].get(key.replace(",", "_stderr,", 1))),
            "n": results["n-samples"][task]["effective"],
            "seed": seed,
        }
        for task in leaf_tasks(results, list(extra_tasks))
        for key, value in results["results"][task].items()
        if "," in key and "_stderr" not in key and isinstance(value, int | float)
    ]
    return pd.concat([table, pd.DataFrame(extra)], ignore_index=True), scored


def _caption_row(scores, spec: ModelSpec, seed: int, n_boot: int) -> pd.DataFrame:
    low, high = bootstrap_ci(scores, n_boot=n_boot, seed=seed)
    row = {
        "model": spec.name,
        "role": spec.role,
        "modality": "image",
        "task": "caption",
        "subset": "all",
        "metric": "cider",
        "value": float(scores.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "stderr": evaluate.standard_error(scores),
        "n": len(scores),
        "seed": seed,
    }
    return pd.DataFrame([row])


def _number(value) -> float:
    return float(value) if isinstance(value, int | float) else math.nan
