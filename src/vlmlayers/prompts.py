"""The study's two prompt forms, as chat messages (one place for every prompt string).

Image form: the image, the question, then the single-word suffix. Text form: "Below are {n}
descriptions of an image..." with numbered captions and the same question and suffix. Both
prefill the assistant turn with "Answer:" so the last prompt token is the same in both forms.
"""

from __future__ import annotations

import pandas as pd
import torch

from vlmlayers.data import image_of

SUFFIX = "Answer the question using a single word or phrase."
TEXT_PREAMBLE = "Below are {n} descriptions of an image. Use them to answer the question."
ANSWER_PREFIX = "Answer:"
CAPTION_REQUEST = "Describe the image briefly."

Message = dict


def _turns(user_content: list[dict], prefill: str) -> list[Message]:
    return [
        {"role": "user", "content": user_content},
        {"role": "assistant", "content": [{"type": "text", "text": prefill}]},
    ]


def image_prompt(question: str) -> str:
    """The user text of the image form: the question, then the single-word suffix."""
    return f"{question}\n{SUFFIX}"


def text_prompt(captions: list[str], question: str) -> str:
    """The user text of the text form: numbered captions, then the same question and suffix."""
    lines = [TEXT_PREAMBLE.format(n=len(captions))]
    lines += [f"{i}. {c}" for i, c in enumerate(captions, start=1)]
    lines += [question, SUFFIX]
    return "\n".join(lines)


def captions_of(row, n_captions: int | None = None) -> list[str]:
    """The first ``n_captions`` (None: all) of a row's ``captions`` list, else its ``caption``."""
    captions = row.get("captions")
    return list(captions)[:n_captions] if captions is not None else [row["caption"]]


def chat(text: str, n_images: int = 0, prefill: str | None = ANSWER_PREFIX) -> list[Message]:
    """One user turn (``n_images`` images, then ``text``), the assistant turn prefilled."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return _turns(content, prefill) if prefill else [{"role": "user", "content": content}]


def image_messages(question: str) -> list[Message]:
    """Image form: image + question + suffix, assistant prefilled with "Answer:"."""
    return chat(image_prompt(question), n_images=1)


def text_messages(captions: list[str], question: str) -> list[Message]:
    """Text form: numbered captions + the same question and suffix."""
    return chat(text_prompt(captions, question))


def caption_messages() -> list[Message]:
    """Captioning prompt (LLaVA stage 1, captioning benchmark); the reply is not prefilled."""
    return chat(CAPTION_REQUEST, n_images=1, prefill=None)


def with_answer(messages: list[Message], answer: str) -> list[Message]:
    """The same conversation with the prefilled reply completed by ``answer``, or with
    ``answer`` as the reply where none is prefilled (for training)."""
    *head, last = messages
    if last["role"] != "assistant":
        return [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    text = last["content"][-1]["text"]
    return [*head, {**last, "content": [{"type": "text", "text": f"{text} {answer}"}]}]


def conversation(row: dict, modality: str, n_captions: int) -> list[Message]:
    """The study's prompt for one dataset row in ``modality`` ("image" or "text")."""
    if modality == "image":
        return image_messages(row["question"])
    if modality == "text":
        return text_messages(captions_of(row, n_captions), row["question"])
    raise ValueError(f"unknown modality {modality!r} (expected 'image' or 'text')")


def render(processor, messages: list[Message]) -> str:
    """Render with the model's own chat template; a trailing assistant turn is continued."""
    prefilled = messages[-1]["role"] == "assistant"
    if not getattr(processor, "image_processor", None):
        messages = [_flatten_text(m) for m in messages]  # text-only LLM templates want strings
    return processor.apply_chat_template(
        messages,
        tokenize=False,
        continue_final_message=prefilled,
        add_generation_prompt=not prefilled,
    )


def _flatten_text(message: Message) -> Message:
    content = message["content"]
    if isinstance(content, str):
        return message
    return {**message, "content": " ".join(i["text"] for i in content if i["type"] == "text")}


def encode(
    processor,
    conversations: list[list[Message]],
    images: list | None = None,
    replies: list[str] | None = None,
):
    """Tokenize a batch (left padding), one image per conversation if ``images`` is given.
    With ``replies``, append each reply + EOS and set ``labels`` to the reply tokens only
    (LLaVA-style instruction loss)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts_text = [render(processor, c) for c in conversations]
    if images is None:  # text only: the tokenizer (PaliGemma's processor demands images) ...
        # ... plus token_type_ids where the processor gives them (PaliGemma's prefix-LM mask)
        wanted = "token_type_ids" in getattr(processor, "model_input_names", ())
        processor, kwargs = tokenizer, {"return_token_type_ids": True} if wanted else {}
    else:  # a flat list would be one conversation's images to some processors (Gemma3)
        kwargs = {"images": [im if isinstance(im, list | tuple) else [im] for im in images]}
    if replies is None:
        return processor(text=prompts_text, return_tensors="pt", padding=True, **kwargs)
    full = [f"{p} {r}{tokenizer.eos_token}" for p, r in zip(prompts_text, replies, strict=True)]
    batch = processor(text=full, return_tensors="pt", padding=True, **kwargs)
    # Both texts hold the same image placeholders, so the tokens past the prompt are the reply.
    count = tokenizer(prompts_text + full, add_special_tokens=True)["input_ids"]
    n = len(prompts_text)
    labels = torch.full_like(batch["input_ids"], -100)
    for i in range(n):
        reply = count[n + i][len(count[i]) :]
        # The last occurrence: some processors append after the text (PaliGemma adds "\n").
        start = find_last(batch["input_ids"][i].tolist(), reply)
        if start < 0:
            raise ValueError(f"reply tokens {reply} not found in the encoded conversation {i}")
        labels[i, start : start + len(reply)] = batch["input_ids"][i, start : start + len(reply)]
    batch["labels"] = labels
    return batch


def find_last(ids: list[int], part: list[int]) -> int:
    """Where the last occurrence of ``part`` in ``ids`` starts, or -1 if there is none."""
    for start in range(len(ids) - len(part), -1, -1):
        if ids[start : start + len(part)] == part:
            return start
    return -1


def encode_rows(
    loaded, rows: pd.DataFrame, modality: str, n_captions: int, replies: list[str] | None = None
):
    """Encode ``rows`` in one prompt form for ``loaded`` (on its device)."""
    conversations = [conversation(r, modality, n_captions) for _, r in rows.iterrows()]
    images = [image_of(r) for _, r in rows.iterrows()] if modality == "image" else None
    batch = encode(loaded.processor, conversations, images, replies)
    return batch.to(loaded.device)
