from __future__ import annotations

import pytest

from logitflow.config import TinyModelConfig
from logitflow.data.tokenize import TruncationCounter, chunk_documents, render_pair, tokenize_pair
from logitflow.models import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TinyModelConfig(vocab_size=400))


PROMPT = [{"role": "user", "content": "What is 12 + 30?"}]


def test_pair_uses_chat_template_and_masks_the_prompt(tokenizer) -> None:
    pair = tokenize_pair(tokenizer, PROMPT, "The answer is 42.", max_length=256)
    prompt_text, response_text = render_pair(tokenizer, PROMPT, "The answer is 42.")
    assert prompt_text == "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    assert response_text == "The answer is 42.<|im_end|>\n"
    assert tokenizer.decode(pair.input_ids[: pair.prompt_length]) == prompt_text
    assert tokenizer.decode(pair.input_ids[pair.prompt_length :]) == response_text
    assert pair.response_mask == [0] * pair.prompt_length + [1] * (len(pair.input_ids) - pair.prompt_length)
    assert not pair.truncated


def test_pair_without_chat_template(tokenizer) -> None:
    plain = build_tiny_tokenizer(TinyModelConfig(vocab_size=400))
    plain.chat_template = None
    prompt_text, response_text = render_pair(plain, PROMPT, "42")
    assert prompt_text == "user: What is 12 + 30?\nassistant: " and response_text == "42<|im_end|>"


def test_long_pair_truncates_prompt_start_then_response_end_and_counts(tokenizer) -> None:
    counter = TruncationCounter()
    long_prompt = [{"role": "user", "content": "word " * 200 + "What is 12 + 30?"}]
    full = tokenize_pair(tokenizer, long_prompt, "The answer is 42.", max_length=10_000)
    pair = tokenize_pair(tokenizer, long_prompt, "The answer is 42.", max_length=64, counter=counter)
    response_length = len(full.input_ids) - full.prompt_length
    assert pair.truncated and len(pair.input_ids) == 64
    assert pair.input_ids[pair.prompt_length :] == full.input_ids[full.prompt_length :]
    assert (
        pair.input_ids[: pair.prompt_length]
        == full.input_ids[full.prompt_length - (64 - response_length) : full.prompt_length]
    )
    long_response = tokenize_pair(tokenizer, PROMPT, "many " * 300, max_length=64, counter=counter)
    assert len(long_response.input_ids) == 64 and long_response.prompt_length < 64
    assert counter.as_dict() == {"total": 2, "truncated": 2, "extra_chunks": 0}


def test_chunking_and_truncating_documents(tokenizer) -> None:
    docs = ["short text", "long text " * 100]
    counter = TruncationCounter()
    chunks = chunk_documents(tokenizer, docs, max_length=32, long_documents="chunk", counter=counter)
    ids_long = tokenizer("long text " * 100, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert all(len(c) <= 32 for c in chunks)
    assert [t for c in chunks[1:] for t in c] == ids_long
    assert counter.truncated == 1 and counter.extra_chunks == len(chunks) - 2
    cut = chunk_documents(tokenizer, docs, max_length=32, long_documents="truncate")
    assert len(cut) == 2 and cut[1] == ids_long[:32]
