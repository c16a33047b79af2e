"""Tiny random checkpoints of every model family in ``vlmlayers.models.ARCHITECTURES``.

``build_tiny(family, out_dir)`` writes a randomly initialised model (hidden 32, 2 layers, 32 px
images) and a working processor with ``save_pretrained(safe_serialization=True)``, so
``vlmlayers.models.load`` reads it through the Auto classes exactly like a hub checkpoint. No
network, no torchvision: image processors are the PIL ("...Pil") classes and every tokenizer is a
word-level ``tokenizers`` tokenizer whose special tokens are the family's own image markers,
with a small chat template that takes our message format (tests/test_models.py uses them all).

``FAMILIES`` lists every family that builds, loads and encodes here. Qwen2-VL and LLaVA-OneVision
need ``video_processor_optional()`` around building and loading when torchvision is missing
(see the comment there): their processors have a video slot that transformers 5.23 cannot fill
or skip without torchvision.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVisionConfig,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    processing_utils,
)
from transformers.models.auto import video_processing_auto
from transformers.utils import is_torchvision_available

from vlmlayers import prompts

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
NEWLINE = "\n"  # a token of its own, as in real tokenizers, so a stray "\n" shows up in tests

IMAGE_SIZE = 32  # pixels; patch 8 -> 4 x 4 patches
PATCH = 8
HIDDEN = 32
N_LAYERS = 2

# Words the tests' prompts use (anything else maps to <unk>, which is fine for random models).
CORPUS = [
    prompts.SUFFIX,
    prompts.TEXT_PREAMBLE,
    prompts.ANSWER_PREFIX,
    prompts.CAPTION_REQUEST,
    "user assistant system : 1 2 3 4 5 n",
    "what colour is the shape ? how many shapes are there ? where is it ? which size ?",
    "a small red circle on the left . a big blue square at the top . green yellow triangle",
    "red blue green yellow circle square triangle star one two three four left right top bottom",
]

# A minimal chat template for our message format: string or list content, {"type": "image"}
# rendered as the family's placeholder. A finished assistant turn ends with </s>, which
# ``continue_final_message`` cuts off. ``apply_chat_template`` finds the last message's text in
# the rendering, so that text is emitted verbatim.
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] }} :"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else %}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' %} IMAGE_PLACEHOLDER{%- else %} {{ item['text'] }}{%- endif -%}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %} </s>{%- endif %}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}assistant :{%- endif -%}"
)


def chat_template(image_placeholder: str) -> str:
    return _TEMPLATE.replace("IMAGE_PLACEHOLDER", image_placeholder)


def _words() -> list[str]:
    split = pre_tokenizers.Whitespace()
    words = {w for text in CORPUS for w, _ in split.pre_tokenize_str(text.lower())}
    return sorted(words)


def build_tokenizer(
    image_tokens: list[str],
    template: str,
    extra_special_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over CORPUS: <s> prepended, "\\n" kept as a token, left padding;
    ``image_tokens`` (the family's markers) are special tokens, never split."""
    specials = [PAD, UNK, BOS, EOS, *image_tokens]
    vocab_list = [*specials, NEWLINE, *_words()]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    # words, punctuation runs and "\n" are tokens; other whitespace separates them
    core.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\n|\w+|[^\w\s]+"), behavior="removed", invert=True
    )
    core.decoder = decoders.WordPiece(prefix="##")
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        chat_template=template,
        model_max_length=4096,
        extra_special_tokens=extra_special_tokens or {},
    )


def _ids(tok: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _decoder(tok: PreTrainedTokenizerFast) -> dict:
    """A tiny decoder-only LM's sizes (Llama-style keys, shared by Llama and Qwen2)."""
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **_ids(tok),
    )


def _llama(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(tie_word_embeddings=False, **_decoder(tok))


def _clip_vision(**kw):
    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        projection_dim=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        **kw,
    )


def _siglip_vision(**kw):
    return SiglipVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        **kw,
    )


_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])


def _save(out_dir: Path, model, processor) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


# --- processors with a video slot, without torchvision ------------------------------------------
# transformers 5.23 cannot even construct Qwen2VLProcessor / LlavaOnevisionProcessor without
# torchvision: ProcessorMixin.__init__ type-checks every sub-processor, and the check for
# `video_processor` looks up `VideoProcessorMixin`, which is not exported when torchvision is
# missing (AttributeError on the dummy VIDEO_PROCESSOR_MAPPING), and `None` is rejected anyway.
# Loading fails too: AutoProcessor calls AutoVideoProcessor.from_pretrained, which raises
# "... requires `torchvision` to be installed". The video classes themselves import torchvision.
# `video_processor_optional()` lifts exactly these two checks (a missing video processor is
# accepted, and loads as None); image and text processing are the real classes, untouched.


class _VideoConfig(dict):
    """Stands in for a video processor when saving: serialised as its config dict."""

    _auto_class = None


def torchvision_available() -> bool:
    return is_torchvision_available()


@contextmanager
def video_processor_optional():
    """Let video-capable processors be built / loaded without torchvision (image use only)."""
    if torchvision_available():
        yield
        return
    mixin = processing_utils.ProcessorMixin
    check = mixin.check_argument_for_proper_class
    auto = video_processing_auto.AutoVideoProcessor

    def lenient_check(self, argument_name, argument):
        if argument_name == "video_processor" and (argument is None or isinstance(argument, dict)):
            return None
        return check(self, argument_name, argument)

    def no_video(cls, *args, **kwargs):
        return None

    original_from_pretrained = auto.__dict__["from_pretrained"]
    mixin.check_argument_for_proper_class = lenient_check
    auto.from_pretrained = classmethod(no_video)
    try:
        yield
    finally:
        mixin.check_argument_for_proper_class = check
        auto.from_pretrained = original_from_pretrained


# Families whose processor needs `video_processor_optional()` when torchvision is missing.
NEEDS_VIDEO_SHIM = {"qwen2_vl", "llava_onevision"}

# --- families -----------------------------------------------------------------------------------


def _build_llama(out_dir: Path) -> Path:
    tok = build_tokenizer([], chat_template("<image>"))
    return _save(out_dir, LlamaForCausalLM(_llama(tok)), tok)


def _build_llava(out_dir: Path) -> Path:
    template = chat_template("<image>")
    tok = build_tokenizer(["<image>"], template)
    config = LlavaConfig(
        vision_config=_clip_vision(),
        text_config=_llama(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        **_NORM,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=template,
    )
    return _save(out_dir, LlavaForConditionalGeneration(config), processor)


PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]


def _build_llava_next(out_dir: Path) -> Path:
    template = chat_template("<image>")
    tok = build_tokenizer(["<image>"], template)
    config = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=_llama(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
        **_NORM,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=template,
    )
    return _save(out_dir, LlavaNextForConditionalGeneration(config), processor)


def _build_llava_onevision(out_dir: Path) -> Path:
    template = chat_template("<image>")
    tok = build_tokenizer(["<image>", "<video>"], template)
    config = LlavaOnevisionConfig(
        vision_config=_siglip_vision(),
        text_config=Qwen2Config(**_decoder(tok)),  # as the released checkpoints
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
        **_NORM,
    )
    # What LlavaOnevisionVideoProcessor would save (it cannot be built without torchvision).
    video = _VideoConfig(
        video_processor_type="LlavaOnevisionVideoProcessor",
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        **_NORM,
    )
    with video_processor_optional():
        processor = LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video,
            num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
            vision_feature_select_strategy="full",
            image_token="<image>",
            video_token="<video>",
            chat_template=template,
        )
    return _save(out_dir, LlavaOnevisionForConditionalGeneration(config), processor)


IDEFICS3_SCALE = 2  # pixel shuffle: (32/8)^2 = 16 patches -> 4 image tokens


def _build_idefics3(out_dir: Path) -> Path:
    template = chat_template("<image>")
    markers = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = build_tokenizer(markers + tiles, template)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
        ),
        text_config=_llama(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=IDEFICS3_SCALE,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * IMAGE_SIZE},  # split into IMAGE_SIZE tiles + a global view
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=True,
        **_NORM,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // IDEFICS3_SCALE**2,
        chat_template=template,
    )
    return _save(out_dir, Idefics3ForConditionalGeneration(config), processor)


def _build_paligemma(out_dir: Path) -> Path:
    template = chat_template("<image>")
    tok = build_tokenizer(["<image>"], template, extra_special_tokens={"image_token": "<image>"})
    n_image_tokens = (IMAGE_SIZE // PATCH) ** 2
    text = GemmaConfig(head_dim=HIDDEN // 4, **_decoder(tok))
    config = PaliGemmaConfig(
        vision_config=_siglip_vision(projection_dim=HIDDEN),
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
        vocab_size=len(tok),
    )
    config.vision_config.num_image_tokens = n_image_tokens
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **_NORM
    )
    image_processor.image_seq_length = n_image_tokens
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=template
    )
    return _save(out_dir, PaliGemmaForConditionalGeneration(config), processor)


GEMMA3_TOKENS_PER_IMAGE = 4  # 4 x 4 patches average-pooled to 2 x 2


def _build_gemma3(out_dir: Path) -> Path:
    boi, eoi, soft = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    template = chat_template(boi)
    tok = build_tokenizer(
        [boi, eoi, soft],
        template,
        extra_special_tokens={"boi_token": boi, "eoi_token": eoi, "image_token": soft},
    )
    text = Gemma3TextConfig(
        head_dim=HIDDEN // 4, query_pre_attn_scalar=HIDDEN // 4, sliding_window=64, **_decoder(tok)
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip_vision(),
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=tok.convert_tokens_to_ids(boi),
        eoi_token_index=tok.convert_tokens_to_ids(eoi),
        image_token_index=tok.convert_tokens_to_ids(soft),
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False, **_NORM
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=GEMMA3_TOKENS_PER_IMAGE,
        chat_template=template,
    )
    return _save(out_dir, Gemma3ForConditionalGeneration(config), processor)


def _build_qwen2_vl(out_dir: Path) -> Path:
    start, pad, end, video = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
    template = chat_template(f"{start}{pad}{end}")
    tok = build_tokenizer([start, pad, end, video], template)
    # head_dim 8: the multimodal rotary sections (temporal, height, width) cover its 4 pairs
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    text = Qwen2VLTextConfig(rope_parameters=mrope, **_decoder(tok))
    vision = Qwen2VLVisionConfig(
        depth=2,
        embed_dim=HIDDEN,
        hidden_size=HIDDEN,
        num_heads=4,
        mlp_ratio=2,
        patch_size=PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids(pad),
        video_token_id=tok.convert_tokens_to_ids(video),
        vision_start_token_id=tok.convert_tokens_to_ids(start),
        vision_end_token_id=tok.convert_tokens_to_ids(end),
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE},
        **_NORM,
    )
    # What Qwen2VLVideoProcessor would save (it cannot be built without torchvision).
    video = _VideoConfig(
        video_processor_type="Qwen2VLVideoProcessor",
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
        size=dict(image_processor.size),
        **_NORM,
    )
    with video_processor_optional():
        processor = Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video,
            chat_template=template,
        )
    return _save(out_dir, Qwen2VLForConditionalGeneration(config), processor)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llama": _build_llama,
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "idefics3": _build_idefics3,
    "paligemma": _build_paligemma,
    "gemma3": _build_gemma3,
    "qwen2_vl": _build_qwen2_vl,
}

FAMILIES = list(BUILDERS)


def build_tiny(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` checkpoint + processor to ``out_dir``; return ``out_dir``."""
    try:
        builder = BUILDERS[family]
    except KeyError:
        raise KeyError(f"no tiny builder for family {family!r}; have {FAMILIES}") from None
    torch.manual_seed(seed)
    return builder(Path(out_dir))
