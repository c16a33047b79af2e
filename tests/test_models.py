"""The per-family module-path table and the prompt encoding, against tiny random checkpoints of
every family (tests/families.py) under the pinned transformers."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil

import pytest
import torch
from families import (
    FAMILIES,
    NEEDS_VIDEO_SHIM,
    build_tiny,
    torchvision_available,
    video_processor_optional,
)
from PIL import Image
from torch import nn

from vlmlayers import models, prompts
from vlmlayers.models import ARCHITECTURES, ModelSpec

QUESTION = "what colour is the shape ?"
LONG_QUESTION = "how many shapes are there on the left and which size is the big red circle ?"
CAPTIONS = ["a small red circle on the left .", "a red circle ."]

# PaliGemma is a prefix LM: its processor inserts <bos> after the image tokens and appends "\n"
# to every prompt that has an image, and it has no chat format of its own. Our image prompts
# therefore end in "\n" there, while the text form (which it only accepts through the tokenizer)
# ends in "Answer:". Its processor also refuses a batch without images.
PREFIX_LM = {"paligemma"}


def _image(seed: int, size=(32, 32)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _load(spec: ModelSpec) -> models.LoadedModel:
    if spec.family in NEEDS_VIDEO_SHIM:
        with video_processor_optional():
            return models.load(spec)
    return models.load(spec)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> directory of its tiny checkpoint (built once per test module)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, checkpoints) -> models.LoadedModel:
    family = request.param
    torch.manual_seed(0)
    return _load(ModelSpec(name=f"tiny-{family}", path=str(checkpoints[family]), family=family))


def _forward(loaded: models.LoadedModel, batch, **kwargs):
    with torch.no_grad():
        return loaded.model(**batch, output_hidden_states=True, **kwargs)


def _image_batch(loaded, questions, images):
    return prompts.encode(
        loaded.processor, [prompts.image_messages(q) for q in questions], images=images
    )


def _text_batch(loaded, questions, replies=None):
    conversations = [prompts.text_messages(CAPTIONS, q) for q in questions]
    return prompts.encode(loaded.processor, conversations, replies=replies)


def _text_config(loaded):
    return loaded.model.config.get_text_config()


# --- the table ----------------------------------------------------------------------------------


def test_every_table_entry_has_a_tiny_family():
    assert set(ARCHITECTURES) <= set(FAMILIES), "add a builder to tests/families.py"


def test_paths_resolve_to_the_right_modules(tiny):
    config = _text_config(tiny)
    paths = tiny.paths
    assert paths == ARCHITECTURES[tiny.model.config.model_type]
    for f in dataclasses.fields(paths):
        dotted = getattr(paths, f.name)
        if dotted is not None and f.name not in paths.BLOCK_RELATIVE:
            assert isinstance(tiny.module(dotted), nn.Module), f"{f.name}: {dotted}"

    layers = tiny.layers
    assert isinstance(layers, nn.ModuleList)
    assert tiny.n_layers == len(layers) == config.num_hidden_layers
    assert all(type(block).__name__.endswith("DecoderLayer") for block in layers)
    assert {"self_attn", "mlp"} <= {name for name, _ in layers[0].named_children()}

    embeddings = tiny.module(paths.embeddings)
    assert isinstance(embeddings, nn.Embedding)
    assert embeddings.num_embeddings == config.vocab_size
    assert tiny.model.get_input_embeddings() is embeddings

    assert "Norm" in type(tiny.module(paths.final_norm)).__name__
    lm_head = tiny.module(paths.lm_head)
    assert isinstance(lm_head, nn.Linear) and lm_head.out_features == config.vocab_size
    assert tiny.model.get_output_embeddings() is lm_head

    if tiny.is_multimodal:
        assert tiny.image_token_id is not None
        vision, projector = tiny.module(paths.vision_tower), tiny.projector
        assert sum(p.numel() for p in vision.parameters()) > 0
        assert sum(p.numel() for p in projector.parameters()) > 0
        # Neither is part of the language model the layer stack belongs to.
        text_ids = {id(m) for m in layers.modules()} | {id(embeddings)}
        assert not text_ids & {id(m) for m in vision.modules()}
        assert not text_ids & {id(m) for m in projector.modules()}
    else:
        assert paths.projector is None and paths.vision_tower is None
        assert tiny.image_token_id is None and tiny.projector is None


def test_block_paths_are_the_mlp_and_the_attention_output(tiny):
    """In every decoder block, ``mlp`` is the MLP and ``attention_out`` the Linear that maps the
    concatenated heads (num_heads x head_dim; gemma3's head_dim is not hidden / heads) back to
    the residual width; where the block has no post-norms, the two outputs are exactly what the
    block adds to its input."""
    config = _text_config(tiny)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    for block in tiny.layers:
        mlp = block.get_submodule(tiny.paths.mlp)
        out = block.get_submodule(tiny.paths.attention_out)
        assert type(mlp).__name__.endswith("MLP")
        assert isinstance(out, nn.Linear)
        assert (out.in_features, out.out_features) == (n_heads * head_dim, config.hidden_size)
        assert out.bias is None  # per-head outputs need no bias split in these families
    batch = (
        _image_batch(tiny, [QUESTION], [_image(0)])
        if tiny.is_multimodal
        else _text_batch(tiny, [QUESTION])
    )
    seen: dict = {}

    def keep(key, pre=False):
        def hook(module, args, output=None):
            value = args[0] if pre else output
            seen[key] = value[0] if isinstance(value, tuple) else value

        return hook

    block = tiny.layers[0]
    handles = [
        block.register_forward_pre_hook(keep("in", pre=True)),
        block.register_forward_hook(keep("out")),
        block.get_submodule(tiny.paths.mlp).register_forward_hook(keep("mlp")),
        block.get_submodule(tiny.paths.attention_out).register_forward_hook(keep("attn")),
    ]
    try:
        _forward(tiny, batch)
    finally:
        for h in handles:
            h.remove()
    # gemma3 norms both outputs again before the add (post_attention / post_feedforward norms)
    if not hasattr(block, "post_feedforward_layernorm"):
        torch.testing.assert_close(seen["in"] + seen["attn"] + seen["mlp"], seen["out"])


def test_table_paths_are_what_produces_hidden_states(tiny):
    """hidden_states[0] is the embeddings' output, hidden_states[l + 1] block l's output and the
    last entry the final norm's (what extraction and interventions hook)."""
    if tiny.is_multimodal:
        batch = _image_batch(tiny, [QUESTION], [_image(0)])
    else:
        batch = _text_batch(tiny, [QUESTION])
    seen = {}

    def keep(key):
        def hook(module, args, output):
            seen[key] = output[0] if isinstance(output, tuple) else output

        return hook

    modules = {"emb": tiny.paths.embeddings, "norm": tiny.paths.final_norm}
    modules |= {i: f"{tiny.paths.layers}.{i}" for i in range(tiny.n_layers)}
    handles = [tiny.module(p).register_forward_hook(keep(k)) for k, p in modules.items()]
    try:
        hidden = _forward(tiny, batch).hidden_states
    finally:
        for h in handles:
            h.remove()
    assert len(hidden) == tiny.n_layers + 1
    text = batch["input_ids"] != (tiny.image_token_id if tiny.is_multimodal else -1)
    torch.testing.assert_close(hidden[0][text], seen["emb"][text])
    for i in range(tiny.n_layers - 1):
        torch.testing.assert_close(hidden[i + 1], seen[i])
    torch.testing.assert_close(hidden[-1], seen["norm"])


# --- prompts through each family's processor ----------------------------------------------------


def _expected_image_tokens(loaded, batch) -> int:
    """How many feature vectors the model computes for the batch's images (its own count)."""
    get = loaded.model.model.get_image_features
    accepted = inspect.signature(get).parameters
    kwargs = {k: v for k, v in batch.items() if k in accepted and k != "input_ids"}
    with torch.no_grad():
        out = get(**kwargs)
    features = getattr(out, "pooler_output", out)
    features = features if isinstance(features, list | tuple) else [features]
    return sum(f.numel() // f.shape[-1] for f in features)


def test_image_prompt_has_the_models_image_tokens(tiny):
    if not tiny.is_multimodal:
        pytest.skip("text-only family")
    batch = _image_batch(tiny, [QUESTION], [_image(0)])
    n_image = int((batch["input_ids"] == tiny.image_token_id).sum())
    assert n_image > 0
    assert n_image == _expected_image_tokens(tiny, batch)
    out = _forward(tiny, batch)
    assert len(out.hidden_states) == tiny.n_layers + 1
    hidden = _text_config(tiny).hidden_size
    assert all(h.shape == (*batch["input_ids"].shape, hidden) for h in out.hidden_states)
    assert torch.isfinite(out.logits).all()


def test_text_prompt_has_no_image(tiny):
    batch = _text_batch(tiny, [QUESTION])
    assert "pixel_values" not in batch
    if tiny.is_multimodal:
        assert not (batch["input_ids"] == tiny.image_token_id).any()
    rendered = prompts.render(tiny.processor, prompts.text_messages(CAPTIONS, QUESTION))
    assert rendered.endswith(prompts.ANSWER_PREFIX) and CAPTIONS[0] in rendered
    # encode() tokenizes text-only batches itself; where the processor takes text alone it must
    # agree (PaliGemma's refuses a batch without images).
    if tiny.is_multimodal and tiny.spec.family not in PREFIX_LM:
        direct = tiny.processor(text=[rendered], return_tensors="pt", padding=True)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in direct:
                assert batch[key].tolist() == direct[key].tolist(), key
    if "token_type_ids" in getattr(tiny.processor, "model_input_names", ()):
        assert (batch["token_type_ids"] == 0).all()
    out = _forward(tiny, batch)
    assert len(out.hidden_states) == tiny.n_layers + 1


def test_last_token_is_the_same_in_both_forms(tiny, request):
    if not tiny.is_multimodal:
        pytest.skip("text-only family")
    if tiny.spec.family in PREFIX_LM:
        request.applymarker(pytest.mark.xfail(strict=True, reason="processor appends '\\n'"))
    image_ids = _image_batch(tiny, [QUESTION], [_image(0)])["input_ids"]
    text_ids = _text_batch(tiny, [QUESTION])["input_ids"]
    answer_ids = tiny.tokenizer(prompts.ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    assert image_ids[0, -1] == text_ids[0, -1] == answer_ids[-1]


def _reply_ids(loaded, reply: str) -> list[int]:
    tok = loaded.tokenizer
    return tok(f" {reply}{tok.eos_token}", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("form", ["image", "text"])
def test_labels_are_exactly_the_reply_tokens(tiny, form):
    if form == "image" and not tiny.is_multimodal:
        pytest.skip("text-only family")
    questions, replies = [QUESTION, LONG_QUESTION], ["red circle", "two"]
    if form == "image":
        conversations = [prompts.image_messages(q) for q in questions]
        images = [_image(0), _image(1, (40, 24))]
    else:
        conversations = [prompts.text_messages(CAPTIONS, q) for q in questions]
        images = None
    plain = prompts.encode(tiny.processor, conversations, images=images)
    batch = prompts.encode(tiny.processor, conversations, images=images, replies=replies)
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape
    for i, reply in enumerate(replies):
        where = (labels[i] != -100).nonzero().flatten()
        expected = _reply_ids(tiny, reply)
        assert labels[i, where].tolist() == expected
        assert where.tolist() == list(range(int(where[0]), int(where[0]) + len(expected)))
        assert (labels[i, where] == ids[i, where]).all()
        # Everything else is the prompt as encoded without a reply (same image tokens too).
        keep = batch["attention_mask"][i].bool()
        keep[where] = False
        prompt = plain["input_ids"][i][plain["attention_mask"][i].bool()]
        assert ids[i][keep].tolist() == prompt.tolist()
    out = _forward(tiny, batch)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("form", ["image", "text"])
def test_left_padding_keeps_every_prompt_intact(tiny, form):
    """A batch of two prompts of different length: left padded, last position real for both,
    and each row's hidden states equal the unpadded prompt's."""
    if form == "image" and not tiny.is_multimodal:
        pytest.skip("text-only family")
    questions = [QUESTION, LONG_QUESTION]
    if form == "image":
        images = [_image(0), _image(1, (40, 24))]
        batch = _image_batch(tiny, questions, images)
        singles = [_image_batch(tiny, [q], [im]) for q, im in zip(questions, images, strict=True)]
    else:
        batch = _text_batch(tiny, questions)
        singles = [_text_batch(tiny, [q]) for q in questions]
    mask, ids = batch["attention_mask"], batch["input_ids"]
    lengths = mask.sum(dim=1)
    assert lengths[0] < lengths[1]
    assert (mask[:, -1] == 1).all()
    assert (ids[:, -1] != tiny.tokenizer.pad_token_id).all()
    assert mask[0, 0] == 0 and (ids[0, mask[0] == 0] == tiny.tokenizer.pad_token_id).all()
    padded = _forward(tiny, batch).hidden_states
    for i, single in enumerate(singles):
        assert ids[i][mask[i].bool()].tolist() == single["input_ids"][0].tolist()
        alone = _forward(tiny, single).hidden_states
        n = int(lengths[i])
        for layer in range(tiny.n_layers + 1):
            torch.testing.assert_close(padded[layer][i, -n:], alone[layer][0], atol=1e-4, rtol=1e-4)


# --- load() -------------------------------------------------------------------------------------


def test_load_refuses_a_directory_without_safetensors(checkpoints, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoints["llava"], pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors") as err:
        models.load(ModelSpec(name="m", path=str(pickled)))
    assert str(pickled) in str(err.value)


def test_load_refuses_a_missing_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        models.load(ModelSpec(name="m", path=str(missing)))
    assert str(missing) in str(err.value)
    # A relative path (as configs write them) that does not exist is tried as a hub id: the
    # error still names it. conftest.py keeps the hub offline.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError) as err:
        models.load(ModelSpec(name="m", path="models/nowhere"))
    assert "models/nowhere" in str(err.value)


def test_load_refuses_a_family_that_disagrees_with_the_checkpoint(checkpoints):
    spec = ModelSpec(name="m", path=str(checkpoints["llava"]), family="idefics3")
    with pytest.raises(ValueError, match="idefics3") as err:
        models.load(spec)
    assert "llava" in str(err.value)


def test_load_reads_no_other_family_and_sets_left_padding(checkpoints):
    loaded = models.load(ModelSpec(name="m", path=str(checkpoints["llama"]), role="base"))
    assert not loaded.is_multimodal and loaded.spec.family is None
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token is not None
    assert not loaded.model.training


class _Spy:
    """Stands in for an Auto class: records the trust_remote_code it is given, then loads."""

    def __init__(self, name: str, real, seen: list):
        self.name, self.real, self.seen = name, real, seen

    def from_pretrained(self, *args, **kwargs):
        self.seen.append((self.name, kwargs.get("trust_remote_code", "absent")))
        return self.real.from_pretrained(*args, **kwargs)


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_what_the_spec_says(checkpoints, monkeypatch, trust):
    """Every Auto class load() calls gets trust_remote_code from the spec (False by default)."""
    import transformers

    seen: list = []
    for name in (
        "AutoModelForImageTextToText",
        "AutoModelForCausalLM",
        "AutoProcessor",
        "AutoTokenizer",
    ):
        monkeypatch.setattr(models, name, _Spy(name, getattr(models, name), seen))
    monkeypatch.setattr(
        transformers, "AutoConfig", _Spy("AutoConfig", transformers.AutoConfig, seen)
    )
    spec_kw = {"trust_remote_code": True} if trust else {}
    for family in ("llava", "llama"):
        models.load(ModelSpec(name="m", path=str(checkpoints[family]), **spec_kw))
    assert {name for name, _ in seen} == {
        "AutoConfig",
        "AutoModelForImageTextToText",
        "AutoModelForCausalLM",
        "AutoProcessor",
        "AutoTokenizer",
    }
    assert all(value is trust for _, value in seen), seen


@pytest.mark.skipif(torchvision_available(), reason="only without torchvision")
@pytest.mark.parametrize("family", sorted(NEEDS_VIDEO_SHIM))
def test_video_capable_processors_need_torchvision_to_load(checkpoints, family):
    """Documents the limitation tests/families.py works around: without torchvision, the
    processor of a family with a video slot does not load through AutoProcessor."""
    processor_config = json.loads((checkpoints[family] / "processor_config.json").read_text())
    assert "video_processor" in processor_config  # the checkpoint itself is complete
    with pytest.raises((ValueError, ImportError, AttributeError), match="(?i)torchvision|video"):
        models.load(ModelSpec(name="m", path=str(checkpoints[family]), family=family))
