"""lmms-eval hooks for contract benchmarks: the study's two prompt forms and its scoring.

The prompt strings and the scoring rule are vlmlayers' own (``vlmlayers.prompts``,
``vlmlayers.evaluate.exact_match``), so lmms-eval and the plain loop ask and score alike.
"""

import numpy as np

from vlmlayers import evaluate, prompts
from vlmlayers.data import image_of


def image_visual(doc: dict) -> list:
    return [image_of(doc)]


def no_visual(doc: dict) -> list:
    return []


def image_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return prompts.image_prompt(doc["question"])


def text_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    n_captions = int((lmms_eval_specific_kwargs or {}).get("n_captions", 2))
    return prompts.text_prompt(prompts.captions_of(doc, n_captions), doc["question"])


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match after normalisation; an empty or missing prediction scores 0."""
    prediction = results[0] if results else None
    return {"exact_match": float(evaluate.exact_match(prediction, doc["answer"]))}


def caption_request(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return prompts.CAPTION_REQUEST


def process_caption(doc: dict, results: list[str]) -> dict:
    return {"cider": {"prediction": results[0] if results else None, "references": doc["captions"]}}


def cider_corpus(items: list[dict]) -> float:
    scores = evaluate.cider([i["prediction"] for i in items], [i["references"] for i in items])
    return float(np.mean(scores))
