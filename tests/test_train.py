"""Training: checkpoints load through Auto classes, frozen parts stay frozen, resume is exact."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vlmlayers.models import ModelSpec, load
from vlmlayers.world import scenes, train
from vlmlayers.world.tokenizer import build_tokenizer


def test_checkpoints_load_through_auto_classes(tiny_models):
    base = load(ModelSpec(name="base", path=str(tiny_models["base"]), role="base"))
    tuned = load(ModelSpec(name="tuned", path=str(tiny_models["tuned"]), family="llava"))
    assert not base.is_multimodal and base.n_layers == 4
    assert tuned.is_multimodal and tuned.n_layers == 4
    assert tuned.image_token_id == tuned.tokenizer.convert_tokens_to_ids("<image>")
    losses = pd.read_csv(tiny_models["tuned"] / "losses.csv")
    assert list(losses["step"]) == [1, 2, 3, 4]
    assert not train.partial_dir(tiny_models["tuned"]).exists()
    for name, path in tiny_models.items():  # the CLI trains where VLMLAYERS_DEVICE says (cpu)
        assert json.loads((path / "training.json").read_text())["device"] == "cpu", name
    base_metrics = json.loads((tiny_models["base"] / "training.json").read_text())["metrics"]
    assert 0.0 <= base_metrics["induction_accuracy"] <= 1.0 and base_metrics["n"] > 0


def test_batches_move_to_the_device_with_nested_labels():
    """The vision tower's labels are a dict of tensors: they must follow the model to a GPU."""
    meta = torch.device("meta")  # a device other than the CPU that every machine has
    batch = {"pixel_values": torch.zeros(2, 3), "labels": {"a": torch.zeros(2)}, "flag": True}
    moved = {k: train._on(meta, v) for k, v in batch.items()}
    assert moved["pixel_values"].device == meta and moved["labels"]["a"].device == meta
    assert moved["flag"] is True


def test_stage1_trains_only_the_projector(tiny_models):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_models["base"])
    vision = CLIPVisionModel.from_pretrained(tiny_models["vision"])
    aligned = load(ModelSpec(name="aligned", path=str(tiny_models["aligned"]))).model
    tuned = load(ModelSpec(name="tuned", path=str(tiny_models["tuned"]))).model
    pairs = [
        (aligned.model.language_model, base.model),
        (aligned.lm_head, base.lm_head),
        (aligned.model.vision_tower, vision),
    ]
    for ours, source in pairs:
        theirs = source.state_dict()
        for name, value in ours.state_dict().items():
            assert torch.equal(value, theirs[name]), name
    projector = aligned.model.multi_modal_projector.state_dict()
    tuned_projector = tuned.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(tuned_projector[k], v) for k, v in projector.items())


def _base_args(
    world, out, steps, instruct_steps=0, chat_steps=0, relation_steps=0, column_steps=0,
    column_cycles=1,
):  # fmt: skip
    return argparse.Namespace(
        world=world,
        out=out,
        steps=steps,
        induction_steps=1,
        repeat_share=0.1,
        instruct_steps=instruct_steps,
        instruct_lr=1e-3,
        chat_steps=chat_steps,
        chat_lr=5e-4,
        relation_steps=relation_steps,
        relation_lr=5e-4,
        column_steps=column_steps,
        column_lr=5e-4,
        column_cycles=column_cycles,
        batch_size=4,
        lr=1e-3,
        warmup=1,
        seed=0,
        checkpoint_every=2,
        layers=2,
        hidden=16,
        heads=2,
        context=64,
        curriculum=1,
        eval_every=2,
    )


@pytest.mark.parametrize(
    "phases",
    [
        dict(instruct_steps=4, chat_steps=2, relation_steps=2, column_steps=2),
        dict(instruct_steps=2, chat_steps=4, relation_steps=2, column_steps=2),
        dict(instruct_steps=2, chat_steps=2, relation_steps=4, column_steps=2),
        dict(instruct_steps=2, chat_steps=2, relation_steps=2, column_steps=4),
        dict(instruct_steps=2, chat_steps=2, relation_steps=2, column_steps=4, column_cycles=2),
    ],
    ids=[
        "killed-in-instruction-tuning",
        "killed-in-chat-tuning",
        "killed-in-relation-tuning",
        "killed-in-column-tuning",
        "killed-in-the-first-of-two-column-cycles",
    ],
)
def test_resume_after_crash_continues_the_same_run(
    phases, tiny_world, tmp_path, monkeypatch, crash_training_at
):
    """Pretraining (steps 1-2), then instruction, chat, relation and column tuning (10 steps
    between them, 14 with two column cycles), killed at the third step of whichever tuning
    phase has four (the first cycle's)."""
    total = 2 + sum(v for k, v in phases.items() if k.endswith("_steps"))
    total += phases["column_steps"] * (phases.get("column_cycles", 1) - 1)
    train.train_base(_base_args(tiny_world, tmp_path / "straight", 2, **phases))
    crash_training_at(3)  # only the phase with 4 steps reaches its step 3
    with pytest.raises(KeyboardInterrupt):
        train.train_base(_base_args(tiny_world, tmp_path / "resumed", 2, **phases))
    partial = train.partial_dir(tmp_path / "resumed")
    assert (partial / train.CHECKPOINT_DIR / "state.pt").exists()
    monkeypatch.undo()
    train.train_base(_base_args(tiny_world, tmp_path / "resumed", 2, **phases))

    straight = pd.read_csv(tmp_path / "straight" / "losses.csv")
    resumed = pd.read_csv(tmp_path / "resumed" / "losses.csv")
    pd.testing.assert_series_equal(straight["loss"], resumed["loss"])
    assert resumed["step"].tolist() == list(range(1, total + 1))
    # the held-out learning curve: scored at steps 2, 4, ... (not the final), once each
    curves = [
        pd.read_json(tmp_path / run / train.LEARNING_CURVE, lines=True)
        for run in ("straight", "resumed")
    ]
    assert curves[0]["step"].tolist() == list(range(2, total, 2))
    pd.testing.assert_frame_equal(*curves)
    assert set(curves[0]["text_accuracy_by_question_type"][0]) <= set(scenes.QUESTIONS)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_column_cycles_restart_the_schedule_on_new_batches(tiny_world, tmp_path):
    """Two column cycles of 3 steps: each warms up again to the peak lr and decays to 0, and
    the second trains on batches the first did not draw (its losses are not the first's)."""
    args = _base_args(tiny_world, tmp_path / "base", 2, column_steps=3, column_cycles=2)
    train.train_base(args)
    log = pd.read_csv(tmp_path / "base" / "losses.csv")
    assert log["step"].tolist() == list(range(1, 9))
    first, second = log.iloc[2:5], log.iloc[5:8]
    np.testing.assert_allclose(first["lr"], [5e-4, 2.5e-4, 0.0], atol=1e-12)
    np.testing.assert_allclose(second["lr"], first["lr"])
    assert not np.allclose(second["loss"], first["loss"])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # checkpoints every 2 steps: the curve would stay empty
        ({"eval_every": 3}, "--eval-every 3 is not a multiple of --checkpoint-every 2"),
        # zero cycles would skip column tuning although --column-steps asks for it
        ({"column_cycles": 0}, "--column-cycles 0: column tuning runs at least one cycle"),
    ],
)
def test_inconsistent_settings_are_refused_before_training(tiny_world, tmp_path, setting, message):
    args = _base_args(tiny_world, tmp_path / "base", 6, column_steps=2)
    vars(args).update(setting)
    with pytest.raises(SystemExit, match=message):
        train.train_base(args)
    assert not (tmp_path / "base").exists()


def test_packed_texts_see_only_themselves():
    """Packing several texts into one row changes nothing a text sees: its logits equal those
    of the text alone, and its first token (predicted from the previous text) is no target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2)
    ).eval()  # fmt: skip
    texts = [[1, 5, 9, 7], [1, 3, 3, 8, 2, 6], [1, 4], [1, 11, 12]]
    rows = train.packed_rows(texts, np.random.default_rng(0), batch_size=3, context=10)
    assert all(sum(map(len, row)) <= 10 for row in rows)
    batch = train.packed_batch(rows, pad_id=0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for r, row in enumerate(rows):
        start = 0
        for text in row:
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([text])).logits[0]
            torch.testing.assert_close(logits[r, start : start + len(text)], alone)
            assert batch["labels"][r, start] == -100
            assert batch["labels"][r, start + 1 : start + len(text)].tolist() == text[1:]
            start += len(text)
        assert (batch["labels"][r, start:] == -100).all()  # padding


def test_reply_loss_covers_the_reply_only():
    """With ``reply_after``, a text holding those tokens is a prompt whose tokens are context,
    not targets; other texts keep the full loss; what each text sees does not change."""
    texts = [[1, 5, 9, 7], [1, 3, 8, 2, 3, 8, 6, 4]]
    rows = [texts]
    full = train.packed_batch(rows, pad_id=0)
    reply = train.packed_batch(rows, pad_id=0, reply_after=[3, 8])
    assert torch.equal(full["attention_mask"], reply["attention_mask"])
    assert reply["labels"][0, :4].tolist() == full["labels"][0, :4].tolist() == [-100, 5, 9, 7]
    assert reply["labels"][0, 4:].tolist() == [-100] * 6 + [6, 4]  # after the last "3 8"


class _Copier(torch.nn.Module):
    """Predicts the token after the latest earlier occurrence of the current token (a perfect
    induction head), or, with ``lag``, the token ``lag`` - 1 positions back (a positional head,
    perfect on lists of length ``lag`` said twice)."""

    def __init__(self, vocab: int, lag: int | None = None):
        super().__init__()
        self.vocab, self.lag = vocab, lag
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids):
        if self.lag is not None:
            predicted = torch.roll(input_ids, self.lag - 1, dims=1)
        else:
            predicted = input_ids.clone()
            for row in range(input_ids.shape[0]):
                seen: dict[int, int] = {}
                for t, token in enumerate(input_ids[row].tolist()):
                    if token in seen:
                        predicted[row, t] = input_ids[row, seen[token] + 1]
                    seen[token] = t
        return argparse.Namespace(logits=torch.nn.functional.one_hot(predicted, self.vocab).float())


def test_induction_accuracy_scores_content_copying_not_a_fixed_offset():
    tokenizer = build_tokenizer(scenes.vocabulary_texts())
    vocab = len(tokenizer)
    assert train.induction_accuracy(_Copier(vocab), tokenizer, seed=0) == 1.0
    for length in train.INDUCTION_LENGTHS:  # right for one list length only
        assert train.induction_accuracy(_Copier(vocab, lag=length), tokenizer, seed=0) < 0.2
