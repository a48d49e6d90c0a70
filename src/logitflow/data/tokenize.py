"""Tokenisation: chat-formatted (prompt, response) pairs with prompt masks, and corpus chunks.

Pairs are rendered with the tokenizer's chat template when it has one (the prompt with the
generation prompt appended; the response as the rest of the full conversation, so it carries the
template's end-of-turn tokens). Prompt and response are tokenised separately and concatenated, so
the boundary between them is exact.

Truncation rule for a pair longer than `max_length`: the prompt loses tokens from its start (the
end of a prompt is what the response answers) down to `max_length // 2` tokens; then the response
loses tokens from its end. Every cut is counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class TokenizedPair:
    input_ids: list[int]
    prompt_length: int  # input_ids[:prompt_length] is the prompt; the rest is the response
    truncated: bool

    @property
    def response_mask(self) -> list[int]:
        return [0] * self.prompt_length + [1] * (len(self.input_ids) - self.prompt_length)


@dataclass
class TruncationCounter:
    total: int = 0
    truncated: int = 0
    extra_chunks: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "truncated": self.truncated, "extra_chunks": self.extra_chunks}


def render_pair(tokenizer: PreTrainedTokenizerBase, prompt: Messages, response: str) -> tuple[str, str]:
    """(prompt text, response text) in the model's chat format."""
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently inside the full conversation")
        return prompt_text, full[len(prompt_text) :]
    prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
    return prompt_text, response + (tokenizer.eos_token or "")


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Messages,
    response: str,
    max_length: int,
    counter: TruncationCounter | None = None,
) -> TokenizedPair:
    prompt_text, response_text = render_pair(tokenizer, prompt, response)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        keep_prompt = max(max_length - len(response_ids), max_length // 2)
        prompt_ids = prompt_ids[-keep_prompt:] if keep_prompt < len(prompt_ids) else prompt_ids
        response_ids = response_ids[: max_length - len(prompt_ids)]
    if counter is not None:
        counter.total += 1
        counter.truncated += int(truncated)
    return TokenizedPair(list(prompt_ids) + list(response_ids), len(prompt_ids), truncated)


def chunk_documents(
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[str],
    max_length: int,
    long_documents: Literal["chunk", "truncate"],
    counter: TruncationCounter | None = None,
) -> list[list[int]]:
    """Each document (with an end-of-text token) as sequences of at most `max_length` tokens:
    split into consecutive chunks, or cut after the first chunk."""
    end = tokenizer.eos_token_id
    sequences = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
        chunks = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
        if counter is not None:
            counter.total += 1
            counter.truncated += int(len(chunks) > 1)
            counter.extra_chunks += len(chunks) - 1 if long_documents == "chunk" else 0
        sequences.extend(chunks if long_documents == "chunk" else chunks[:1])
    return sequences


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), both LongTensor [B, longest], padded on the right."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask
