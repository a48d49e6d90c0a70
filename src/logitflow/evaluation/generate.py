"""Batched generation from chat prompts (greedy, or sampled with a seed), with the count of
generated tokens and the time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class Generations:
    texts: list[str]
    new_tokens: int  # generated tokens, up to and including each sequence's end token
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    autocast: Any,
    sampling: Sampling | None = None,
) -> Generations:
    """Continuations of chat prompts (left-padded batches): greedy, or drawn with `sampling`'s
    temperature and top-p from a generator seeded once (the same seed, the same texts on CPU).
    `autocast` is a context factory."""
    model.eval()
    decoding: dict[str, Any] = {"do_sample": False, "top_p": None, "top_k": None}
    if sampling is not None:
        torch.manual_seed(sampling.seed)
        decoding = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": None}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, new_tokens, seconds = [], 0, 0.0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            rendered = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + batch_size]
            ]
            inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            with autocast():
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    **decoding,
                )
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - began
            generated = output[:, inputs["input_ids"].shape[1] :]
            for row in generated.tolist():
                ended = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                new_tokens += ended
                texts.append(tokenizer.decode(row[:ended], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return Generations(texts, new_tokens, seconds)
