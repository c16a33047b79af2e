"""Interventions: empty windows change nothing, full knockout makes text blind to the image,
transplant + patching reproduce the donor exactly, hooks and weights are always restored, and
knockout works on a tiny random model of every vision family; the CLI writes the tidy table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from families import FAMILIES, NEEDS_VIDEO_SHIM, build_tiny, video_processor_optional
from PIL import Image

from vlmlayers import intervene, models, prompts
from vlmlayers.cli import main
from vlmlayers.extract import capture_residuals
from vlmlayers.models import ModelSpec, load


@pytest.fixture(scope="module")
def aligned(tiny_models):
    return load(ModelSpec(name="aligned", path=str(tiny_models["aligned"]), role="aligned"))


@pytest.fixture(scope="module")
def tuned(tiny_models):
    return load(ModelSpec(name="tuned", path=str(tiny_models["tuned"]), role="tuned"))


@pytest.fixture(scope="module")
def rows(tiny_world):
    return pd.read_parquet(tiny_world / "test.parquet").head(4)


@pytest.fixture(scope="module")
def means(aligned, rows):
    return intervene.image_means(aligned, rows, batch_size=4)


def _batch(loaded, rows, modality="image"):
    return prompts.encode_rows(loaded, rows, modality, 2)


def _logits(loaded, batch):
    with torch.no_grad():
        return loaded.model(**batch).logits


def _hooks(loaded):
    """Every module's hooks (transformers keeps output-recording forward hooks of its own)."""
    return {
        name: (list(module._forward_pre_hooks), list(module._forward_hooks))
        for name, module in loaded.model.named_modules()
    }


def _no_hooks(loaded, before=None):
    assert not loaded.model._forward_pre_hooks
    for layer in loaded.layers:
        assert not layer._forward_pre_hooks
        assert not layer.self_attn._forward_pre_hooks
    if before is not None:
        assert _hooks(loaded) == before


def _state(loaded):
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in loaded.model.named_parameters()}


def _assert_restored(loaded, before):
    for name, param in loaded.model.named_parameters():
        ptr, value = before[name]
        assert param.data_ptr() == ptr, name
        assert torch.equal(param, value), name


def test_empty_window_leaves_logits_bit_identical(aligned, tuned, rows, means):
    batch = _batch(aligned, rows)
    reference = _logits(aligned, batch)
    hooks = _hooks(aligned)
    for context in (
        intervene.knockout(aligned, [], queries="text"),
        intervene.knockout(aligned, [], queries="last"),
        intervene.ablate(aligned, means, []),
        intervene.transplant(aligned, tuned, []),
        intervene.patch(aligned, tuned, []),
    ):
        with context:
            assert torch.equal(_logits(aligned, batch), reference)
    _no_hooks(aligned, hooks)


def test_knockout_of_all_layers_makes_text_positions_blind_to_the_image(aligned, rows):
    other = rows.assign(image=rows["image"].iloc[::-1].to_list())  # same questions, other images
    first, second = _batch(aligned, rows), _batch(aligned, other)
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert not torch.equal(first["pixel_values"], second["pixel_values"])
    assert not torch.equal(_logits(aligned, first)[:, -1], _logits(aligned, second)[:, -1])
    everything = range(aligned.n_layers)
    with intervene.knockout(aligned, everything, queries="text"):
        blind = _logits(aligned, first)[:, -1], _logits(aligned, second)[:, -1]
    assert torch.equal(*blind)
    # only the last token blocked: earlier text positions still carry the image to it
    with intervene.knockout(aligned, everything, queries="last"):
        last = _logits(aligned, first)[:, -1], _logits(aligned, second)[:, -1]
    assert not torch.equal(*last)


def test_knockout_mask_blocks_exactly_the_chosen_queries(aligned):
    image = aligned.image_token_id
    tokens = intervene._Tokens(aligned)
    ids = torch.tensor([[5, image, image, 6, 7, 8]])
    token = intervene._PROMPT_END.set(torch.tensor([4]))  # prompt ends at position 4
    try:
        tokens.hook(aligned.model, (), {"input_ids": ids})
    finally:
        intervene._PROMPT_END.reset(token)
    causal = torch.ones(6, 6).tril().bool()
    text = intervene.knockout_mask(None, 6, tokens, "text")[0, 0]
    expected = causal.clone()
    expected[3:, 1:3] = False  # text queries after the image lose the image keys
    assert torch.equal(text, expected)
    last = intervene.knockout_mask(None, 6, tokens, "last")[0, 0]
    expected = causal.clone()
    expected[4:, 1:3] = False  # the last prompt token and the reply
    assert torch.equal(last, expected)
    # an additive (eager) mask gets -inf-like entries at the same places
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    out = intervene.knockout_mask(additive, 6, tokens, "text")[0, 0]
    assert torch.equal(out == 0, text)


def test_transplant_of_everything_reproduces_the_donor_and_restores(aligned, tuned, rows):
    batch = _batch(aligned, rows)
    target = _logits(tuned, batch)
    before = _state(aligned)
    everything = range(aligned.n_layers)
    # stage 2 also trains the embeddings and projector: give aligned tuned's layer-0 input
    with (
        intervene.transplant(aligned, tuned, everything),
        intervene.patch(aligned, tuned, [0], positions="all"),
    ):
        assert torch.equal(_logits(aligned, batch), target)
        head = aligned.module(aligned.paths.lm_head).weight
        assert head.data_ptr() == tuned.module(tuned.paths.lm_head).weight.data_ptr()
        projector = next(aligned.projector.parameters())
        assert projector.data_ptr() == before[_name_of(aligned, projector)][0]
    _assert_restored(aligned, before)
    assert not torch.equal(_logits(aligned, batch), target)
    # a window below the top leaves the head and final norm alone
    with intervene.transplant(aligned, tuned, [0, 1]):
        head = aligned.module(aligned.paths.lm_head).weight
        assert head.data_ptr() == before["lm_head.weight"][0]
        assert aligned.layers[0].mlp.up_proj.weight.data_ptr() == (
            tuned.layers[0].mlp.up_proj.weight.data_ptr()
        )
        assert aligned.layers[2].mlp.up_proj.weight.data_ptr() != (
            tuned.layers[2].mlp.up_proj.weight.data_ptr()
        )
    _assert_restored(aligned, before)


def _name_of(loaded, param):
    return next(n for n, p in loaded.model.named_parameters() if p is param)


def test_hooks_and_weights_are_restored_when_the_block_raises(aligned, tuned, rows, means):
    batch = _batch(aligned, rows)
    _logits(aligned, batch)
    before, hooks = _state(aligned), _hooks(aligned)
    L = aligned.n_layers
    for context in (
        intervene.knockout(aligned, range(L), queries="text"),
        intervene.ablate(aligned, means, range(L + 1)),
        intervene.patch(aligned, tuned, range(L + 1)),
        intervene.transplant(aligned, tuned, range(L)),
    ):
        with pytest.raises(RuntimeError, match="inside the block"), context:
            _logits(aligned, batch)
            raise RuntimeError("inside the block")
        _no_hooks(aligned, hooks)
        _assert_restored(aligned, before)


def test_patching_every_point_reproduces_the_donor_image_states(aligned, tuned, rows):
    batch = _batch(aligned, rows)
    is_image = batch["input_ids"] == aligned.image_token_id
    with torch.no_grad(), capture_residuals(tuned) as captured:
        tuned.model(**batch)
    donor = dict(captured)
    points = range(aligned.n_layers + 1)
    with intervene.patch(aligned, tuned, points), capture_residuals(aligned) as patched:
        _logits(aligned, batch)
    for point in points:
        assert torch.equal(patched[point][is_image], donor[point][is_image]), point
    # text positions are still the recipient's own computation
    assert not torch.equal(patched[2][~is_image], donor[2][~is_image])


def test_ablation_writes_the_dataset_mean_at_image_positions(aligned, rows, means):
    batch = _batch(aligned, rows)
    is_image = batch["input_ids"] == aligned.image_token_id
    n_image = int(is_image[0].sum())
    assert means[1].shape == (n_image, aligned.model.config.text_config.hidden_size)
    with intervene.ablate(aligned, means, [0, 1]), capture_residuals(aligned) as captured:
        _logits(aligned, batch)
    for point in (0, 1):
        expected = means[point].repeat(len(rows), 1)
        assert torch.equal(captured[point][is_image], expected)


def test_windows():
    assert intervene.windows(4, 2, 2) == [(0, 1), (2, 3)]
    assert intervene.windows(5, 2, 2) == [(0, 1), (2, 3), (4, 4)]
    assert intervene.windows(4, 1, 2, "cumulative-bottom") == [(0, 0), (0, 2), (0, 3)]
    assert intervene.windows(5, 2, 2, "cumulative-top") == [(3, 4), (1, 4), (0, 4)]
    with pytest.raises(ValueError, match="mode"):
        intervene.windows(4, 2, 2, "diagonal")


def test_window_depths_follow_the_store_and_the_blocks():
    depth = intervene.window_depth
    assert depth((0, 1), 12, "sliding", blocks=True) == 1 / 12  # blocks 0-1 span depth 0 to 2/12
    assert depth((0, 2), 12, "sliding", blocks=False) == 1 / 12  # residual points 0..2
    assert depth((4, 12), 12, "cumulative-top", blocks=False) == 4 / 12  # ablate from point 4 on
    assert depth((4, 11), 12, "cumulative-top", blocks=True) == 4 / 12  # blocks 4.. from depth 4
    assert depth((0, 5), 12, "cumulative-bottom", blocks=True) == 6 / 12  # up to block 5's output
    assert np.isnan(depth((-1, -1), 12, "sliding", blocks=True))


COLUMNS = [
    "intervention", "window_start", "window_end", "relative_depth", "model", "task", "subset",
    "metric", "value", "baseline", "delta", "ci_low", "ci_high", "n",
]  # fmt: skip


@pytest.mark.parametrize(
    "intervention, extra",
    [
        ("knockout", ["--queries", "last"]),
        ("ablation", []),
        ("transplant", ["--mode", "cumulative-top", "--modalities", "image", "text"]),
        ("patching", []),
    ],
)
def test_cli_writes_the_tidy_table(tiny_models, tiny_world, tmp_path, intervention, extra):
    out = tmp_path / "table.parquet"
    donor = ["--donor-path", str(tiny_models["tuned"])]
    main(
        [
            "intervene",
            "--model",
            "aligned",
            "--path",
            str(tiny_models["aligned"]),
            "--data",
            str(tiny_world / "test.parquet"),
            "--intervention",
            intervention,
            "--limit",
            "6",
            "--batch-size",
            "6",
            "--n-boot",
            "50",
            "--out",
            str(out),
            *(donor if intervention in ("transplant", "patching") else []),
            *extra,
        ]
    )
    table = pd.read_parquet(out)
    assert set(COLUMNS) <= set(table.columns)
    assert set(table["intervention"]) == {intervention}
    assert set(table["metric"]) == {"accuracy", "answer_logprob"}
    base = table[table["window_start"] == -1]
    assert len(base) and base["relative_depth"].isna().all()
    measured = base["value"].notna()  # a subset may be empty (held-out pairs) in 6 rows
    assert measured.any() and (base.loc[measured, "delta"] == 0).all()
    spans = table[table["window_start"] >= 0][["window_start", "window_end"]].drop_duplicates()
    expected = {
        "knockout": [(0, 1), (2, 3)],
        "ablation": [(3, 4), (1, 4), (0, 4)],  # from residual point l on
        "transplant": [(2, 3), (0, 3)],
        "patching": [(0, 1), (2, 3), (4, 4)],
    }[intervention]
    assert list(map(tuple, spans.to_numpy())) == expected
    windowed = table[table["window_start"] >= 0]
    delta = windowed["value"] - windowed["baseline"]
    pd.testing.assert_series_equal(delta, windowed["delta"], check_names=False)
    assert windowed["relative_depth"].between(0, 1).all()
    whole = table[table["subset"] == "all"]
    per_window = whole.groupby(["window_start", "modality", "metric"])["n"].sum()
    assert (per_window == 6).all()  # every row scored once per window, split over the tasks
    # every intervention moves the answer log-probability somewhere (for knockout of the answer
    # positions this needs the prompt end of the teacher-forced pass, not its last token)
    logprob = windowed[windowed["metric"] == "answer_logprob"]
    assert (logprob["delta"].abs() > 1e-6).any()
    if intervention == "transplant":
        assert set(table["modality"]) == {"image", "text"}


# --- every vision family ----------------------------------------------------------------------

VISION_FAMILIES = [f for f in FAMILIES if models.ARCHITECTURES[f].vision_tower is not None]


@pytest.fixture(scope="module", params=VISION_FAMILIES)
def family_model(request, tmp_path_factory):
    family = request.param
    path = build_tiny(family, tmp_path_factory.mktemp(family))
    spec = ModelSpec(name=f"tiny-{family}", path=str(path), family=family)
    if family in NEEDS_VIDEO_SHIM:
        with video_processor_optional():
            return load(spec)
    return load(spec)


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_knockout_on_every_vision_family(family_model):
    loaded = family_model
    questions = ["what colour is the shape ?", "how many shapes are there ?"]
    conversations = [prompts.image_messages(q) for q in questions]

    def batch(seeds):
        return prompts.encode(loaded.processor, conversations, images=[_image(s) for s in seeds])

    first, second = batch([1, 2]), batch([3, 4])
    assert torch.equal(first["input_ids"], second["input_ids"])
    reference = _logits(loaded, first)
    hooks = _hooks(loaded)
    with intervene.knockout(loaded, []):
        assert torch.equal(_logits(loaded, first), reference)
    everything = range(loaded.n_layers)
    with intervene.knockout(loaded, everything, queries="text"):
        blind = _logits(loaded, first)[:, -1], _logits(loaded, second)[:, -1]
    torch.testing.assert_close(*blind, rtol=0, atol=1e-6)
    assert not torch.allclose(reference[:, -1], blind[0], rtol=0, atol=1e-6)
    with intervene.knockout(loaded, [0], queries="last"):
        assert torch.isfinite(_logits(loaded, first)).all()
        out = loaded.model.generate(
            **first, max_new_tokens=2, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id
        )
    assert out.shape[1] > first["input_ids"].shape[1]
    _no_hooks(loaded, hooks)
