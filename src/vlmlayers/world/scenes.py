"""Build the tiny world: procedural scenes, paraphrased captions, a fact corpus and VQA splits.

Deterministic from ``--seed``. Writes, in the dataset contract (``vlmlayers.data``):
``train.parquet`` (stage 1/2 data, held-out colour x shape pairs removed), ``test.parquet``
(the held-out benchmark: sub-tasks ``vision`` and ``knowledge``), ``analysis.parquet`` (distinct
scenes with one question each, for extraction, probes and geometry) and ``corpus.parquet``
(text-only pretraining corpus for the base LM).
"""

from __future__ import annotations

import argparse
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlmlayers import prompts
from vlmlayers.io import write_parquet
from vlmlayers.world.chat import render_chat

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
SIZES = {"small": 0.16, "big": 0.30}  # object radius as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
COUNTS = {1: "one", 2: "two", 3: "three"}

# Facts stated only in the corpus: knowledge questions need the image *and* one of these.
OWNER_OF_COLOUR = {"red": "tom", "green": "ann", "blue": "max", "yellow": "eve"}
MATERIAL_OF_SHAPE = {"circle": "wood", "square": "stone", "triangle": "glass", "diamond": "metal"}

CAPTION_TEMPLATES = (
    "{count} {size} {colour} {noun} on the {position} .",
    "there {be} {count} {size} {colour} {noun} on the {position} .",
    "on the {position} {be} {count} {colour} {noun} , {size} .",
    "the picture shows {count} {size} {colour} {noun} on the {position} .",
)
OWNER_FACTS = (
    "{colour} shapes belong to {owner} .",
    "{owner} owns every {colour} shape .",
    "a {colour} shape is owned by {owner} .",
)
MATERIAL_FACTS = (
    "every {shape} is made of {material} .",
    "{shape}s are made of {material} .",
    "a {shape} is built from {material} .",
)
VISION_QUESTIONS = {
    "colour": ("what colour are the shapes ?", "which colour do the shapes have ?"),
    "shape": ("what shape are they ?", "which shape is shown ?"),
    "size": ("what size are the shapes ?", "are the shapes big or small ?"),
    "position": ("where are the shapes ?", "on which side are the shapes ?"),
    "count": ("how many shapes are there ?", "what is the number of shapes ?"),
}
KNOWLEDGE_QUESTIONS = {
    "owner": ("who owns the shapes ?", "whose shapes are these ?"),
    "material": ("what are the shapes made of ?", "which material are the shapes made of ?"),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    count: int

    def answer(self, question_type: str) -> str:
        if question_type == "owner":
            return OWNER_OF_COLOUR[self.colour]
        if question_type == "material":
            return MATERIAL_OF_SHAPE[self.shape]
        if question_type == "count":
            return COUNTS[self.count]
        return getattr(self, question_type)

    def captions(self) -> list[str]:
        """Every paraphrase of this scene's description."""
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        words = dict(
            count=COUNTS[self.count],
            size=self.size,
            colour=self.colour,
            noun=noun,
            position=self.position,
            be="is" if self.count == 1 else "are",
        )
        return [t.format(**words) for t in CAPTION_TEMPLATES]


ALL_SCENES = [
    Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, COUNTS)
]
QUESTION_TYPES = {
    **{q: "vision" for q in VISION_QUESTIONS},
    **{q: "knowledge" for q in KNOWLEDGE_QUESTIONS},
}
QUESTIONS = {**VISION_QUESTIONS, **KNOWLEDGE_QUESTIONS}


def render(scene: Scene, rng: np.random.Generator, size: int) -> bytes:
    """Draw ``scene`` as a PNG: jittered placement, radius and colour on a noisy grey field."""
    background = rng.integers(90, 140, size=3)
    noise = rng.normal(0, 6, size=(size, size, 3))
    canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    radius = SIZES[scene.size] * size / 2 * rng.uniform(0.85, 1.15)
    colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[scene.colour])
    horizontal = scene.position in ("top", "bottom")
    for i in range(scene.count):
        offset = (i - (scene.count - 1) / 2) * radius * 2.1
        x = cx * size + (offset if horizontal else 0) + rng.normal(0, size * 0.02)
        y = cy * size + (0 if horizontal else offset) + rng.normal(0, size * 0.02)
        _draw_shape(draw, scene.shape, x, y, radius, colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def heldout_pairs(n: int, seed: int) -> set[tuple[str, str]]:
    """``n`` (shape, colour) pairs kept out of stage 1/2 data (a Latin pattern, so every shape
    and every colour is still seen in training)."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    shift = int(rng.integers(len(colours)))
    pairs = [(s, colours[(i + shift) % len(colours)]) for i, s in enumerate(SHAPES)]
    return set(pairs[:n])


def sample_rows(
    n: int,
    rng: np.random.Generator,
    split: str,
    image_size: int,
    scenes: list[Scene],
    heldout: set[tuple[str, str]],
) -> list[dict]:
    """``n`` samples, each a fresh scene + one question, question types balanced."""
    types = list(QUESTIONS)
    rows = []
    for i in tqdm(range(n), desc=f"world {split}", unit="scene", leave=False):
        scene = scenes[int(rng.integers(len(scenes)))]
        qtype = types[i % len(types)]
        captions = scene.captions()
        rng.shuffle(captions)
        rows.append(
            {
                "id": f"{split}-{i:06d}",
                "image": render(scene, rng, image_size),
                "caption": captions[0],
                "captions": captions,
                "question": QUESTIONS[qtype][int(rng.integers(len(QUESTIONS[qtype])))],
                "answer": scene.answer(qtype),
                "task": QUESTION_TYPES[qtype],
                "heldout_pair": (scene.shape, scene.colour) in heldout,
                "labels.colour": scene.colour,
                "labels.shape": scene.shape,
                "labels.size": scene.size,
                "labels.position": scene.position,
                "labels.count": COUNTS[scene.count],
                "labels.question_type": qtype,
            }
        )
    return rows


def _facts() -> list[str]:
    facts = [t.format(colour=c, owner=o) for c, o in OWNER_OF_COLOUR.items() for t in OWNER_FACTS]
    return facts + [
        t.format(shape=s, material=m) for s, m in MATERIAL_OF_SHAPE.items() for t in MATERIAL_FACTS
    ]


def corpus_texts(n: int, rng: np.random.Generator, n_captions: int) -> list[str]:
    """The base LM's pretraining mix (DESIGN.md, measured to work): 65% text-form QA with
    full-sequence loss, 15% paraphrase pairs, 10% facts, 10% plain captions."""
    facts = _facts()
    texts = []
    types = list(QUESTIONS)
    for _ in range(n):
        scene = ALL_SCENES[int(rng.integers(len(ALL_SCENES)))]
        captions = scene.captions()
        rng.shuffle(captions)
        kind = rng.random()
        if kind < 0.65:
            qtype = types[int(rng.integers(len(types)))]
            question = QUESTIONS[qtype][int(rng.integers(len(QUESTIONS[qtype])))]
            messages = prompts.text_messages(captions[:n_captions], question)
            texts.append(render_chat(prompts.with_answer(messages, scene.answer(qtype))))
        elif kind < 0.80:
            texts.append(f"{captions[0]} in other words , {captions[1]}")
        elif kind < 0.90:
            texts.append(facts[int(rng.integers(len(facts)))])
        else:
            texts.append(captions[0])
    return texts


def vocabulary_texts() -> list[str]:
    """Every string the world can produce (captions, questions, answers, facts, prompts), so the
    tokenizer is a function of this module alone, whatever the split sizes or seed."""
    texts = [c for scene in ALL_SCENES for c in scene.captions()]
    texts += [q for variants in QUESTIONS.values() for q in variants]
    texts += [scene.answer(q) for scene in ALL_SCENES for q in QUESTIONS]
    texts += _facts() + ["in other words ,"]
    texts += [render_chat(prompts.caption_messages())]
    for n in range(1, 10):
        texts.append(render_chat(prompts.text_messages(["x"] * n, "?")))
    texts.append(render_chat(prompts.image_messages("?")))
    return texts


def build(
    out_dir: Path,
    seed: int,
    image_size: int,
    n_train: int,
    n_test: int,
    n_analysis: int,
    n_corpus: int,
    n_heldout_pairs: int,
    n_captions: int,
) -> None:
    rng = np.random.default_rng(seed)
    heldout = heldout_pairs(n_heldout_pairs, seed)
    seen = [s for s in ALL_SCENES if (s.shape, s.colour) not in heldout]
    splits = {
        "train": sample_rows(n_train, rng, "train", image_size, seen, heldout),
        "test": sample_rows(n_test, rng, "test", image_size, ALL_SCENES, heldout),
        "analysis": sample_rows(n_analysis, rng, "analysis", image_size, ALL_SCENES, heldout),
    }
    for name, rows in splits.items():
        write_parquet(pd.DataFrame(rows), out_dir / f"{name}.parquet")
    corpus = pd.DataFrame({"text": corpus_texts(n_corpus, rng, n_captions)})
    write_parquet(corpus, out_dir / "corpus.parquet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=4000, help="stage 1/2 training samples")
    parser.add_argument("--n-test", type=int, default=700, help="held-out benchmark samples")
    parser.add_argument("--n-analysis", type=int, default=1000, help="samples for the analyses")
    parser.add_argument("--n-corpus", type=int, default=20000, help="base-LM corpus texts")
    parser.add_argument(
        "--n-heldout-pairs",
        type=int,
        default=4,
        help="(shape, colour) pairs kept out of stage 1/2 data",
    )
    parser.add_argument(
        "--n-captions",
        type=int,
        default=2,
        help="captions in a text-form prompt ('Below are n descriptions...')",
    )


def run(args: argparse.Namespace) -> None:
    build(
        args.out,
        args.seed,
        args.image_size,
        args.n_train,
        args.n_test,
        args.n_analysis,
        args.n_corpus,
        args.n_heldout_pairs,
        args.n_captions,
    )
