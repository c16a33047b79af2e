"""The tiny world's word-level tokenizer, chat template and LLaVA processor.

Saved with ``save_pretrained`` so later stages load them through ``AutoProcessor`` /
``AutoTokenizer`` exactly like hub checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from vlmlayers.world.chat import CHAT_TEMPLATE, IMAGE

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)

PRE_TOKENIZER = pre_tokenizers.Whitespace()


def words_of(texts: Iterable[str]) -> set[str]:
    """The word-level vocabulary of ``texts`` after lower-casing and pre-tokenization."""
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in PRE_TOKENIZER.pre_tokenize_str(text.lower()))
    return words - set(SPECIAL_TOKENS)


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts``; prepends <s>; pads on the left."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(words_of(texts))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = PRE_TOKENIZER
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.add_special_tokens(list(SPECIAL_TOKENS))
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
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int
) -> LlavaProcessor:
    """LLaVA processor: CLIP-style preprocessing; one <image> expands to (size/patch)^2 tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,
    )
