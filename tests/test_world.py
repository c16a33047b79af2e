"""The tiny world: deterministic, held-out pairs kept out of training, prompts tokenized."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmlayers import prompts
from vlmlayers.cli import main
from vlmlayers.data import image_of
from vlmlayers.world import scenes
from vlmlayers.world.chat import render_chat
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
    held = scenes.heldout_pairs(4, seed=0)
    assert len(held) == 4
    assert {s for s, _ in held} == set(scenes.SHAPES)  # every shape still seen with other colours
    train_pairs = set(zip(train["labels.shape"], train["labels.colour"], strict=True))
    assert not train_pairs & held
    assert not train["heldout_pair"].any()
    assert test["heldout_pair"].any()


def test_answers_follow_scene_and_facts(tiny_world):
    test = pd.read_parquet(tiny_world / "test.parquet")
    for _, row in test.iterrows():
        qtype = row["labels.question_type"]
        if qtype == "owner":
            assert row["answer"] == scenes.OWNER_OF_COLOUR[row["labels.colour"]]
            assert row["task"] == "knowledge"
        elif qtype == "material":
            assert row["answer"] == scenes.MATERIAL_OF_SHAPE[row["labels.shape"]]
        else:
            assert row["answer"] == row[f"labels.{qtype}"]
            assert row["task"] == "vision"
        assert row["caption"] in row["captions"]


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
    processor = build_processor(tokenizer, image_size=32, patch_size=8)
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
