"""The tiny world: deterministic, held-out pairs kept out of training, prompts tokenized."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from vlmlayers import prompts
from vlmlayers.cli import main
from vlmlayers.data import image_of
from vlmlayers.world import scenes, train
from vlmlayers.world.chat import REPLY_START, render_chat
from vlmlayers.world.tokenizer import build_processor, build_tokenizer, words_of


def test_same_seed_same_world(tiny_world, tmp_path):
    main(
        [
            "world",
            "--out",
            str(tmp_path),
            "--n-train",
            "128",
            "--n-test",
            "32",
            "--n-analysis",
            "48",
            "--n-corpus",
            "300",
            "--seed",
            "0",
        ]
    )
    for name in ("train", "test", "analysis", "corpus"):
        assert (tmp_path / f"{name}.parquet").read_bytes() == (
            tiny_world / f"{name}.parquet"
        ).read_bytes(), name


def test_heldout_pairs_only_outside_training(tiny_world):
    train = pd.read_parquet(tiny_world / "train.parquet")
    test = pd.read_parquet(tiny_world / "test.parquet")
    held = scenes.heldout_pairs(len(scenes.SHAPES), seed=0)
    assert len(held) == len(scenes.SHAPES)
    assert {s for s, _ in held} == set(scenes.SHAPES)  # every shape still seen with other colours
    assert {c for _, c in held} == set(scenes.COLOURS)  # ... and every colour with other shapes
    train_pairs = set(zip(train["labels.shape"], train["labels.colour"], strict=True))
    assert not train_pairs & held
    assert not train["heldout_pair"].any()
    assert test["heldout_pair"].any()


def test_answers_follow_scene_and_facts(tiny_world):
    test = pd.read_parquet(tiny_world / "test.parquet")
    assert set(test["labels.question_type"]) == set(scenes.QUESTIONS)
    for _, row in test.iterrows():
        qtype = row["labels.question_type"]
        colour, shape = row["labels.colour"], row["labels.shape"]
        assert row["task"] == scenes.QUESTION_TYPES[qtype]
        assert row["caption"] in row["captions"]
        text = " ".join(row["captions"])
        # the target object is in every caption with its size and cell
        assert f"a {row['labels.size']} {colour} {shape} on the {row['labels.position']}" in text
        expected = {
            "colour": colour,
            "shape": shape,
            "size": row["labels.size"],
            "position": row["labels.position"],
            "count": row["labels.count"],
            "owner": scenes.OWNER_OF_COLOUR[colour],
            "material": scenes.MATERIAL_OF_SHAPE[shape],
            "home": scenes.HOME_OF_OWNER[scenes.OWNER_OF_COLOUR[colour]],
        }
        if qtype in scenes.RELATIONS:
            assert row["answer"] in ("yes", "no")
            assert row["labels.count"] != "one"
        else:
            assert row["answer"] == expected[qtype], (qtype, row["question"], text)


def test_relation_answers_follow_the_cells():
    """Relations are inferred from cells and sizes; yes and no are balanced."""
    a = scenes.Thing("circle", "red", "big", "top left")
    b = scenes.Thing("square", "blue", "small", "bottom right")
    c = scenes.Thing("ring", "white", "big", "top right")
    assert scenes.relation_holds("left", a, b) and scenes.relation_holds("above", a, b)
    assert not scenes.relation_holds("left", b, a) and scenes.relation_holds("below", b, a)
    assert not scenes.relation_holds("above", a, c) and not scenes.relation_holds("below", a, c)
    assert scenes.relation_holds("bigger", a, b) and not scenes.relation_holds("bigger", a, c)
    assert scenes.relation_holds("smaller", b, c)
    rng = np.random.default_rng(0)
    scene = scenes.Scene((a, c, b))
    answers = [scenes.ask(scene, "horizontal", rng)[1] for _ in range(200)]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65
    assert scenes.ask(scenes.Scene((a,)), "vertical", rng) is None  # one object: no relation


def test_vocabulary_covers_every_text(tiny_world):
    tokenizer = build_tokenizer(scenes.vocabulary_texts())
    corpus = pd.read_parquet(tiny_world / "corpus.parquet")["text"]
    assert not words_of(corpus) - set(tokenizer.get_vocab())
    assert tokenizer.unk_token_id not in tokenizer(list(corpus))["input_ids"][0]


def test_chat_template_matches_hf_rendering():
    tokenizer = build_tokenizer(scenes.vocabulary_texts())
    messages = prompts.with_answer(
        prompts.text_messages(["a red circle ."], "what colour ?"), "red"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_chat(messages)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_prompt_forms_end_with_same_token(modality, tiny_world):
    tokenizer = build_tokenizer(scenes.vocabulary_texts())
    processor = build_processor(tokenizer, image_size=48, patch_size=12)
    row = pd.read_parquet(tiny_world / "analysis.parquet").iloc[0].to_dict()
    images = [image_of(row)] if modality == "image" else None
    batch = prompts.encode(processor, [prompts.conversation(row, modality, 2)], images)
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[-2:] == ["answer", ":"]
    n_image = tokens.count("<image>")
    assert n_image == (16 if modality == "image" else 0)


def test_reply_labels_cover_only_the_answer():
    tokenizer = build_tokenizer(scenes.vocabulary_texts())
    batch = prompts.encode(
        tokenizer,
        [
            prompts.text_messages(["a red circle ."], "what colour ?"),
            prompts.text_messages(["two big blue squares ."], "why ?"),
        ],
        replies=["red", "blue"],
    )
    for row, answer in zip(range(2), ["red", "blue"], strict=True):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert tokenizer.convert_ids_to_tokens(labelled) == [answer, "</s>"]


def test_statements_are_true_of_their_scene():
    """Every corpus statement about a scene holds in it: attributes of the named object and
    relations inferred from cells and sizes."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = scenes.random_scene(rng)
        by_shape = {t.shape: t for t in scene.things}
        by_colour = {t.colour: t for t in scene.things}
        for sentence in scenes.statements(scene, rng, 20).split(" . "):
            words = sentence.rstrip(" .").split()
            if words[2] == "one":  # "the red one is a circle"
                assert by_colour[words[1]].shape == words[-1]
                continue
            thing = by_shape[words[1]]
            rest = " ".join(words[3:])
            if rest.startswith("on the "):
                assert thing.cell == rest.removeprefix("on the ")
            elif rest in scenes.COLOURS or rest in scenes.SIZES:
                assert rest in (thing.colour, thing.size)
            else:  # "the circle is left of the square", "... bigger than ..."
                assert scenes.relation_holds(words[3], thing, by_shape[words[-1]]), sentence


@pytest.mark.parametrize(
    "kinds", [scenes.RELATION_KINDS, scenes.COLUMN_KINDS], ids=["relation", "column"]
)
def test_relation_texts_are_answered_from_their_descriptions(kinds):
    """Relation tuning's questions (row, column, position, the relations) and column tuning's
    (column, position, horizontal) come with the answer their scene gives, read back from the first
    description, and each kind asked for is asked, and no other."""
    asked = []
    for text in scenes.relation_texts(120, np.random.default_rng(0), 2, kinds):
        lines = text.split("\n")
        caption, question = lines[1].removeprefix("1. ").removesuffix(" ."), lines[3]
        answer = text.split(prompts.ANSWER_PREFIX)[1].removesuffix("</s>").strip()
        things = {}
        for part in re.split(r" , | and ", caption):  # one object each
            words = part.split()
            shape = next(w for w in words if w in scenes.SHAPES)
            cell = re.search(r"(top|bottom) (left|right)", part).group(0)
            size = next(w for w in words if w in scenes.SIZES)
            things[shape] = scenes.Thing(shape, "", size, cell)
        named = [w for w in question.split() if w in scenes.SHAPES]
        target = things[named[0]]
        if "row" in question.split() or "column" in question.split():
            kind = "row" if "row" in question.split() else "column"
            assert answer == target.cell.split()[kind == "column"], text
        elif len(named) == 1:
            kind = "position"
            assert answer == target.cell, text
        else:
            word = next(w for w in question.split() if w in scenes.RELATION_STATEMENTS)
            kind = next(k for k, words in scenes.RELATION_WORDS.items() if word in words)
            holds = scenes.relation_holds(word, target, things[named[1]])
            assert answer == ("yes" if holds else "no"), text
        asked.append(kind)
    assert set(asked) == set(kinds)


def test_chat_texts_put_a_caption_where_the_image_goes():
    """Chat tuning's conversations are the image form (question + suffix, "Answer:") or the
    captioning request, a caption of the scene in the image's place; the loss starts after
    REPLY_START, so it covers the reply ("Answer: <answer>" or another paraphrase)."""
    tokenizer = build_tokenizer(scenes.vocabulary_texts())
    texts = scenes.chat_texts(40, np.random.default_rng(0))
    reply_start = tokenizer(REPLY_START, add_special_tokens=False)["input_ids"]
    for text in texts:
        prompt, reply = (part.strip() for part in text.split(REPLY_START))
        body, answer = prompt.removeprefix("user : "), reply.removesuffix("</s>").strip()
        if prompts.CAPTION_REQUEST in body:  # "<caption> Describe the image briefly."
            caption = body.removesuffix(f" {prompts.CAPTION_REQUEST}")
            expected = prompts.caption_messages()
            assert answer != caption  # another paraphrase, not a copy
        else:  # "<caption> <question>\n<suffix>" then "Answer: <answer>"
            caption, question = body.split(" . ", 1)
            caption += " ."
            expected = prompts.image_messages(question.removesuffix(f"\n{prompts.SUFFIX}"))
            answer = answer.removeprefix(prompts.ANSWER_PREFIX).strip()
        # the image form's words, the caption standing where the image is
        image_form = render_chat(prompts.with_answer(expected, answer))
        assert text == image_form.replace(" <image>", f" {caption}")
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        labels = train.packed_batch([[ids]], tokenizer.pad_token_id, reply_start)["labels"][0]
        scored = tokenizer.convert_ids_to_tokens(labels[labels != -100])
        assert scored == tokenizer.tokenize(reply)
    kinds = [prompts.CAPTION_REQUEST in t for t in texts]
    assert sum(kinds) == len(texts) // 2
