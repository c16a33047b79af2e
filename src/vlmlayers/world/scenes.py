"""Build the tiny world: procedural scenes, paraphrased captions, a fact corpus and VQA splits.

A scene holds one to three objects (shape, colour, size) in distinct cells of a 2 x 2 grid;
shapes and colours are distinct within a scene, so "the circle" or "the red shape" names one
object. Captions state each object's cell; the relations questions ask about (left of, above,
bigger than) must be *inferred* from those cells and sizes. The corpus states facts that chain
(a colour's owner, the owner's home city; a shape's material), so knowledge questions need the
image *and* one or two facts.

Deterministic from ``--seed``. Writes, in the dataset contract (``vlmlayers.data``):
``train.parquet`` (stage 1/2 data, scenes with a held-out colour x shape pair removed),
``test.parquet`` (the held-out benchmark: sub-tasks ``vision`` and ``knowledge``),
``analysis.parquet`` (distinct scenes with one question each, for extraction, probes and
geometry), ``corpus.parquet`` (text-only pretraining corpus for the base LM) and ``world.json``
(the settings it was built with, which the base LM's manifest records). ``chat_texts`` and
``relation_texts`` (the base LM's chat, relation and column tuning) are not written: ``train_base``
draws them from its own seed.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlmlayers import prompts
from vlmlayers.io import write_json, write_parquet
from vlmlayers.world.chat import render_chat

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
PLURALS = {s: f"{s}es" if s.endswith("s") else f"{s}s" for s in SHAPES}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
SIZES = {"small": 0.50, "big": 0.85}  # object radius as a fraction of half a cell side
# (row, column) of each cell of the 2 x 2 grid, in reading order
CELLS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
COUNTS = {1: "one", 2: "two", 3: "three"}
MAX_OBJECTS = max(COUNTS)

# Facts stated only in the corpus; they chain: colour -> owner -> home.
OWNER_OF_COLOUR = {
    "red": "tom",
    "green": "ann",
    "blue": "max",
    "yellow": "eve",
    "purple": "sam",
    "white": "kim",
}
HOME_OF_OWNER = {
    "tom": "rome",
    "ann": "paris",
    "max": "oslo",
    "eve": "lima",
    "sam": "cairo",
    "kim": "tokyo",
}
MATERIAL_OF_SHAPE = {
    "circle": "wood",
    "square": "stone",
    "triangle": "glass",
    "diamond": "metal",
    "cross": "clay",
    "ring": "gold",
}

# Paraphrases: a frame around one object phrase (with its cell) per object, joined by commas
# and "and". Attributes come before and after the noun, and the cell before and after the object.
CAPTION_TEMPLATES = (
    ("{objects} .", "a {size} {colour} {shape} on the {cell}"),
    ("there is {objects} .", "a {size} {colour} {shape} on the {cell}"),
    ("the picture shows {objects} .", "a {size} {colour} {shape} on the {cell}"),
    ("{objects} .", "on the {cell} is a {size} {colour} {shape}"),
    ("{objects} .", "the {cell} has a {size} {colour} {shape}"),
    ("{objects} .", "a {size} {shape} in {colour} on the {cell}"),
    ("we see {objects} .", "on the {cell} a {shape} in {colour} that is {size}"),
)

OWNER_FACTS = (
    "{colour} shapes belong to {owner} .",
    "{owner} owns every {colour} shape .",
    "a {colour} shape is owned by {owner} .",
)
HOME_FACTS = (
    "{owner} lives in {home} .",
    "the home of {owner} is {home} .",
    "{home} is where {owner} lives .",
)
# Facts about the grid itself: in every caption "top" and "bottom" (and "left" and "right")
# appear in the same contexts; these are the texts that tell them apart, as real text does.
SPACE_FACTS = (
    "the top row is above the bottom row .",
    "the bottom row is below the top row .",
    "the left column is left of the right column .",
    "the right column is right of the left column .",
    "the sky is at the top and the ground is at the bottom .",
    "the sun rises on the right and sets on the left .",
)
MATERIAL_FACTS = (
    "every {shape} is made of {material} .",
    "{plural} are made of {material} .",
    "a {shape} is built from {material} .",
)

# Question type -> templates. {shape}/{colour} name the target object, {other} a second one.
VISION_QUESTIONS = {
    "colour": ("what colour is the {shape} ?", "which colour does the {shape} have ?"),
    "shape": ("which shape is {colour} ?", "what is the shape of the {colour} object ?"),
    "size": ("what size is the {shape} ?", "is the {shape} big or small ?"),
    "position": ("where is the {shape} ?", "in which corner is the {shape} ?"),
    "count": ("how many shapes are there ?", "how many objects does the picture show ?"),
    "horizontal": ("is the {shape} left of the {other} ?", "is the {shape} right of the {other} ?"),
    "vertical": ("is the {shape} above the {other} ?", "is the {shape} below the {other} ?"),
    "comparative": (
        "is the {shape} bigger than the {other} ?",
        "is the {shape} smaller than the {other} ?",
    ),
}
KNOWLEDGE_QUESTIONS = {
    "owner": ("who owns the {shape} ?", "whose is the {shape} ?"),
    "material": ("what is the {colour} shape made of ?", "which material is the {colour} one ?"),
    "home": (
        "where does the owner of the {shape} live ?",
        "in which city lives the {shape} owner ?",
    ),
}
RELATIONS = ("horizontal", "vertical", "comparative")  # questions about a pair of objects
# Where one object is, one coordinate at a time: asked only while the base LM is tuned on
# relations and columns (``relation_texts``), not in the benchmark. They make the LM fetch an
# object's column at the first answer word, which neither position questions (row first) nor
# any text in the corpus asks for, and which a horizontal question needs for both of its objects.
COORDINATE_QUESTIONS = {
    "row": ("which row is the {shape} in ?", "in which row is the {shape} ?"),
    "column": ("which column is the {shape} in ?", "in which column is the {shape} ?"),
}

# What the corpus says about a scene right after its caption: one statement per attribute of each
# object, and every relation that holds between two objects.
STATEMENTS = (
    "the {shape} is {colour} .",
    "the {colour} one is a {shape} .",
    "the {shape} is {size} .",
    "the {shape} is on the {cell} .",
)
RELATION_STATEMENTS = {
    "left": "the {shape} is left of the {other} .",
    "right": "the {shape} is right of the {other} .",
    "above": "the {shape} is above the {other} .",
    "below": "the {shape} is below the {other} .",
    "bigger": "the {shape} is bigger than the {other} .",
    "smaller": "the {shape} is smaller than the {other} .",
}


@dataclass(frozen=True)
class Thing:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    cell: str

    def phrase(self, template: str) -> str:
        return template.format(shape=self.shape, colour=self.colour, size=self.size, cell=self.cell)


def relation_holds(word: str, a: Thing, b: Thing) -> bool:
    """Whether ``a`` is <word> ``b`` (word: left/right/above/below/bigger/smaller)."""
    (ra, ca), (rb, cb) = CELLS[a.cell], CELLS[b.cell]
    big_a, big_b = a.size == "big", b.size == "big"
    return {
        "left": ca < cb,
        "right": ca > cb,
        "above": ra < rb,
        "below": ra > rb,
        "bigger": big_a and not big_b,
        "smaller": big_b and not big_a,
    }[word]


RELATION_WORDS = {  # the word each relation template asks about, in template order
    "horizontal": ("left", "right"),
    "vertical": ("above", "below"),
    "comparative": ("bigger", "smaller"),
}


@dataclass(frozen=True)
class Scene:
    """One to three objects with distinct shapes, colours and cells (in reading order)."""

    things: tuple[Thing, ...]

    def captions(self, rng: np.random.Generator) -> list[str]:
        """Every paraphrase, objects listed in a random order in each."""
        texts = []
        for frame, phrase in CAPTION_TEMPLATES:
            order = rng.permutation(len(self.things))
            parts = [self.things[i].phrase(phrase) for i in order]
            joined = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
            texts.append(frame.format(objects=joined))
        return texts


def statements(scene: Scene, rng: np.random.Generator, n: int) -> str:
    """``n`` true statements about ``scene`` (attributes and relations), in random order."""
    true = [t.phrase(s) for t in scene.things for s in STATEMENTS]
    true += [
        template.format(shape=a.shape, other=b.shape)
        for a in scene.things
        for b in scene.things
        if a is not b
        for word, template in RELATION_STATEMENTS.items()
        if relation_holds(word, a, b)
    ]
    return " ".join(true[i] for i in rng.permutation(len(true))[:n])


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str, Thing] | None:
    """A question of ``qtype`` about ``scene``: (question, answer, target object), or None
    if the scene cannot pose it (a relation needs two objects). Yes/no answers are balanced."""
    templates = QUESTIONS[qtype]
    things = scene.things
    target = things[int(rng.integers(len(things)))]
    words = {"shape": target.shape, "colour": target.colour}
    if qtype in RELATIONS:
        if len(things) < 2:
            return None
        pairs = [(a, b) for a in things for b in things if a is not b]
        options = [(i, a, b) for a, b in pairs for i in range(len(templates))]
        want_yes = bool(rng.integers(2))
        fitting = [
            o
            for o in options
            if relation_holds(RELATION_WORDS[qtype][o[0]], o[1], o[2]) == want_yes
        ]
        index, target, other = (fitting or options)[int(rng.integers(len(fitting or options)))]
        truth = relation_holds(RELATION_WORDS[qtype][index], target, other)
        question = templates[index].format(shape=target.shape, other=other.shape)
        return question, "yes" if truth else "no", target
    answer = {
        "colour": target.colour,
        "shape": target.shape,
        "size": target.size,
        "position": target.cell,
        "count": COUNTS[len(things)],
        "owner": OWNER_OF_COLOUR[target.colour],
        "material": MATERIAL_OF_SHAPE[target.shape],
        "home": HOME_OF_OWNER[OWNER_OF_COLOUR[target.colour]],
    }[qtype]
    if qtype == "count":
        target = things[0]
    question = templates[int(rng.integers(len(templates)))].format(**words)
    return question, answer, target


QUESTION_TYPES = {
    **{q: "vision" for q in VISION_QUESTIONS},
    **{q: "knowledge" for q in KNOWLEDGE_QUESTIONS},
}
QUESTIONS = {**VISION_QUESTIONS, **KNOWLEDGE_QUESTIONS}


def random_scene(
    rng: np.random.Generator, avoid: frozenset[tuple[str, str]] = frozenset()
) -> Scene:
    """A scene with 1-3 objects, none of them an ``avoid`` (shape, colour) pair."""
    while True:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        shapes = rng.choice(len(SHAPES), n, replace=False)
        colours = rng.choice(len(COLOURS), n, replace=False)
        cells = sorted(rng.choice(len(CELLS), n, replace=False))
        things = tuple(
            Thing(SHAPES[s], list(COLOURS)[c], list(SIZES)[int(rng.integers(2))], list(CELLS)[k])
            for s, c, k in zip(shapes, colours, cells, strict=True)
        )
        if not any((t.shape, t.colour) in avoid for t in things):
            return Scene(things)


def render(scene: Scene, rng: np.random.Generator, size: int) -> bytes:
    """Draw ``scene`` as a PNG: each object jittered inside its cell (placement, radius,
    colour) on a noisy grey field."""
    background = rng.integers(90, 140, size=3)
    noise = rng.normal(0, 6, size=(size, size, 3))
    canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    half_cell = size / 4
    for thing in scene.things:
        row, col = CELLS[thing.cell]
        radius = SIZES[thing.size] * half_cell * rng.uniform(0.9, 1.1)
        slack = max(half_cell - radius, 0.0)
        x = (2 * col + 1) * half_cell + rng.uniform(-slack, slack) * 0.6
        y = (2 * row + 1) * half_cell + rng.uniform(-slack, slack) * 0.6
        colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[thing.colour])
        _draw_shape(draw, thing.shape, x, y, radius, colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=max(2, round(r / 3)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def heldout_pairs(n: int, seed: int) -> frozenset[tuple[str, str]]:
    """``n`` (shape, colour) pairs kept out of stage 1/2 data (a Latin pattern, so every shape
    and every colour is still seen in training)."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    shift = int(rng.integers(len(colours)))
    pairs = [(s, colours[(i + shift) % len(colours)]) for i, s in enumerate(SHAPES)]
    return frozenset(pairs[:n])


def sample_rows(
    n: int,
    rng: np.random.Generator,
    split: str,
    image_size: int,
    heldout: frozenset[tuple[str, str]],
    allow_heldout: bool,
) -> list[dict]:
    """``n`` samples, each a fresh scene + one question, question types balanced; without
    ``allow_heldout``, no scene holds a held-out pair."""
    types = list(QUESTIONS)
    rows = []
    for i in tqdm(range(n), desc=f"world {split}", unit="scene", leave=False):
        qtype = types[i % len(types)]
        asked = None
        while asked is None:
            scene = random_scene(rng, frozenset() if allow_heldout else heldout)
            asked = ask(scene, qtype, rng)
        question, answer, target = asked
        captions = scene.captions(rng)
        rng.shuffle(captions)
        rows.append(
            {
                "id": f"{split}-{i:06d}",
                "image": render(scene, rng, image_size),
                "caption": captions[0],
                "captions": captions,
                "question": question,
                "answer": answer,
                "task": QUESTION_TYPES[qtype],
                "heldout_pair": any((t.shape, t.colour) in heldout for t in scene.things),
                # the object the question is about (the first one for a count question)
                "labels.colour": target.colour,
                "labels.shape": target.shape,
                "labels.size": target.size,
                "labels.position": target.cell,
                "labels.count": COUNTS[len(scene.things)],
                "labels.question_type": qtype,
            }
        )
    return rows


def _facts() -> list[str]:
    facts = [t.format(colour=c, owner=o) for c, o in OWNER_OF_COLOUR.items() for t in OWNER_FACTS]
    facts += [t.format(owner=o, home=h) for o, h in HOME_OF_OWNER.items() for t in HOME_FACTS]
    facts += SPACE_FACTS
    return facts + [
        t.format(shape=s, plural=PLURALS[s], material=m)
        for s, m in MATERIAL_OF_SHAPE.items()
        for t in MATERIAL_FACTS
    ]


def text_form_qa(captions: list[str], question: str, answer: str) -> str:
    """A text-form question about the scene ``captions`` describe, with its answer, as the
    base LM reads it (the chat template, rendered)."""
    return render_chat(prompts.with_answer(prompts.text_messages(captions, question), answer))


# The base LM's pretraining mix: share of each kind of text (corpus_texts)
CORPUS_MIX = {
    "qa": 0.35,
    "statements": 0.25,
    "bindings": 0.15,
    "paraphrase": 0.10,
    "fact": 0.10,
    "caption": 0.05,
}
N_STATEMENTS = 5  # statements after a caption


def corpus_texts(n: int, rng: np.random.Generator, n_captions: int) -> pd.DataFrame:
    """The base LM's pretraining mix (``CORPUS_MIX``): text-form QA, a caption followed by true
    statements about its objects (the dense form of what QA asks), a caption followed by each
    object's shape and colour (bindings), paraphrase pairs, facts, plain captions
    (models/tinyworld/README.md has what each did and did not change). Every scene may appear
    (the LM knows the whole world, as an LLM knows language). Columns ``text`` and ``objects``
    (how many objects the text describes; 0 for a fact), so that pretraining can start with
    the simplest texts."""
    facts = _facts()
    texts, objects = [], []
    types = list(QUESTIONS)
    kinds, shares = list(CORPUS_MIX), list(CORPUS_MIX.values())
    for _ in range(n):
        scene = random_scene(rng)
        captions = scene.captions(rng)
        rng.shuffle(captions)
        kind = kinds[int(rng.choice(len(kinds), p=shares))]
        objects.append(len(scene.things))
        if kind == "qa":
            asked = None
            while asked is None:
                asked = ask(scene, types[int(rng.integers(len(types)))], rng)
            question, answer, _ = asked
            texts.append(text_form_qa(captions[:n_captions], question, answer))
        elif kind == "statements":
            texts.append(f"{captions[0]} {statements(scene, rng, N_STATEMENTS)}")
        elif kind == "bindings":
            things = [scene.things[i] for i in rng.permutation(len(scene.things))]
            texts.append(" ".join([captions[0], *(f"{t.shape} {t.colour} ." for t in things)]))
        elif kind == "paraphrase":
            texts.append(f"{captions[0]} in other words , {captions[1]}")
        elif kind == "fact":
            texts.append(facts[int(rng.integers(len(facts)))])
            objects[-1] = 0
        else:
            texts.append(captions[0])
    return pd.DataFrame({"text": texts, "objects": objects})


def chat_texts(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` conversations in the forms a VLM is asked in, a caption standing where the image
    goes: alternately a question with the image form's words (``prompts.image_prompt``) and the
    captioning request answered by another paraphrase. The base LM's chat tuning
    (``train_base --chat-steps``): a chat LLM has met a question or request after some
    context, while the corpus's QA only ever follows the text form's numbered descriptions."""
    types = list(QUESTIONS)
    texts = []
    for i in range(n):
        scene = random_scene(rng)
        captions = scene.captions(rng)
        rng.shuffle(captions)
        if i % 2:
            messages = prompts.chat(f"{captions[0]} {prompts.CAPTION_REQUEST}", prefill=None)
            reply = captions[1]
        else:
            asked = None
            while asked is None:
                asked = ask(scene, types[int(rng.integers(len(types)))], rng)
            question, reply, _ = asked
            messages = prompts.chat(f"{captions[0]} {prompts.image_prompt(question)}")
        texts.append(render_chat(prompts.with_answer(messages, reply)))
    return texts


RELATION_KINDS = (*COORDINATE_QUESTIONS, "position", *RELATIONS)  # relation tuning's questions
# column tuning's: the column lookup at each place a question needs it (the first answer word,
# the word after the row, both objects of a horizontal question)
COLUMN_KINDS = ("column", "position", "horizontal")


def relation_texts(
    n: int, rng: np.random.Generator, n_captions: int, kinds: tuple[str, ...] = RELATION_KINDS
) -> list[str]:
    """``n`` text-form questions about where objects are and how they relate, answered: one of
    ``kinds`` (of ``COORDINATE_QUESTIONS``, position and ``RELATIONS``) drawn uniformly with
    each scene, a relation drawn for a one-object scene dropped with it (so with all kinds the
    relations come a third less often: 0.13-0.14 of the texts each, the others 0.19-0.21).
    The base LM's relation tuning (``train_base --relation-steps``, all kinds) and column
    tuning (``--column-steps``, ``COLUMN_KINDS``): models/tinyworld/README.md has why."""
    texts = []
    while len(texts) < n:
        scene = random_scene(rng)
        captions = scene.captions(rng)
        rng.shuffle(captions)
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind in COORDINATE_QUESTIONS:
            target = scene.things[int(rng.integers(len(scene.things)))]
            templates = COORDINATE_QUESTIONS[kind]
            question = templates[int(rng.integers(len(templates)))].format(shape=target.shape)
            row, column = target.cell.split()
            answer = row if kind == "row" else column
        else:
            asked = ask(scene, kind, rng)
            if asked is None:  # a relation needs two objects
                continue
            question, answer, _ = asked
        texts.append(text_form_qa(captions[:n_captions], question, answer))
    return texts


def vocabulary_texts() -> list[str]:
    """Texts holding every word the world can produce (captions, questions, answers, facts,
    prompts), so the tokenizer is a function of this module alone, whatever the split sizes
    or seed."""
    values = {
        "shape": SHAPES,
        "other": SHAPES,
        "colour": tuple(COLOURS),
        "size": tuple(SIZES),
        "cell": tuple(CELLS),
    }
    templates = [t for pair in CAPTION_TEMPLATES for t in pair]
    templates += [t for variants in QUESTIONS.values() for t in variants]
    templates += [t for variants in COORDINATE_QUESTIONS.values() for t in variants]
    templates += [*STATEMENTS, *RELATION_STATEMENTS.values()]
    texts = [t.format(**{k: v[i % len(v)] for k, v in values.items()}, objects="and ,")
             for t in templates for i in range(len(SHAPES))]  # fmt: skip
    texts += [*COUNTS.values(), "yes no", *PLURALS.values()]
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
    splits = {
        "train": sample_rows(n_train, rng, "train", image_size, heldout, allow_heldout=False),
        "test": sample_rows(n_test, rng, "test", image_size, heldout, allow_heldout=True),
        "analysis": sample_rows(
            n_analysis, rng, "analysis", image_size, heldout, allow_heldout=True
        ),
    }
    for name, rows in splits.items():
        write_parquet(pd.DataFrame(rows), out_dir / f"{name}.parquet")
    write_parquet(corpus_texts(n_corpus, rng, n_captions), out_dir / "corpus.parquet")
    settings = dict(seed=seed, image_size=image_size, n_train=n_train, n_test=n_test,
                    n_analysis=n_analysis, n_corpus=n_corpus, n_heldout_pairs=n_heldout_pairs,
                    n_captions=n_captions)  # fmt: skip
    write_json(settings, out_dir / "world.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=4000, help="stage 1/2 training samples")
    parser.add_argument("--n-test", type=int, default=1100, help="held-out benchmark samples")
    parser.add_argument("--n-analysis", type=int, default=1100, help="samples for the analyses")
    parser.add_argument("--n-corpus", type=int, default=50000, help="base-LM corpus texts")
    parser.add_argument(
        "--n-heldout-pairs",
        type=int,
        default=len(SHAPES),
        help=f"(shape, colour) pairs kept out of stage 1/2 data (at most {len(SHAPES)})",
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
