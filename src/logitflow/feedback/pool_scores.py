"""Reference-policy scores of the pair pool (response_a in the `chosen` slot, response_b in the
`rejected` slot), made by score_prefs' sharded, resumable pass and cached under
`paths.caches`/pool_scores, keyed by the policy, the tokenizer and the pool's fingerprint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from logitflow.cache.ref_scores import PairScores, ScoreJob, load_scores, run_score_pass
from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import Params
from logitflow.data.pool import Pool
from logitflow.data.tokenize import TokenizedPair, TruncationCounter, tokenize_pair
from logitflow.models import load_materialized, read_model_card
from logitflow.stages.models import model_dir
from logitflow.stages.score_prefs import TRUNCATION_RULE

SPLIT = "pool"


class TokenizedPool(Sequence):
    """The pool's pairs, tokenised a shard at a time as the scoring pass asks for them."""

    def __init__(self, pairs: datasets.Dataset, tokenizer: Any, max_length: int, counter: TruncationCounter):
        self.pairs, self.tokenizer, self.max_length, self.counter = pairs, tokenizer, max_length, counter

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: Any) -> Any:
        if not isinstance(item, slice):
            return self[item : item + 1][0]
        rows = self.pairs[item]
        return [
            (self._tokenize(prompt, a), self._tokenize(prompt, b))
            for prompt, a, b in zip(rows["prompt"], rows["response_a"], rows["response_b"], strict=True)
        ]

    def _tokenize(self, prompt: list[dict[str, str]], response: str) -> TokenizedPair:
        return tokenize_pair(self.tokenizer, prompt, response, self.max_length, self.counter)


def pool_scores_dir(params: Params, root: Path) -> Path:
    return root / params.paths.caches / "pool_scores"


def score_pool(params: Params, root: Path, pool: Pool) -> PairScores:
    apply_threads(params.compute)
    device = resolve_device(params.compute)
    directory = model_dir(params, root, "policy")
    card = read_model_card(directory)
    policy = load_materialized(directory)
    tokenizer = policy.tokenizer
    job = ScoreJob(
        directory=pool_scores_dir(params, root),
        key={
            "schema": "logitflow.pool_scores",
            "policy_weights_sha256": card["weights_sha256"],
            "tokenizer_sha256": card["tokenizer_sha256"],
            "chat_template": tokenizer.chat_template or "",
            "max_length": params.data.max_length,
            "truncation": TRUNCATION_RULE,
            "pool_fingerprint": pool.fingerprint,
            "pooling": params.score_prefs.pooling,
            "precision": params.compute.precision,
            "batch_pairs": params.score_prefs.batch_pairs,
        },
        pairs=TokenizedPool(pool.pairs, tokenizer, params.data.max_length, TruncationCounter()),
        splits={SPLIT: (0, len(pool))},
        pairs_per_shard=params.score_prefs.pairs_per_shard,
        batch_pairs=params.score_prefs.batch_pairs,
        pooling=params.score_prefs.pooling,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    model = policy.model.to(device=device, dtype=inference_dtype(params.compute))
    run_score_pass(model, job, device, lambda: autocast(params.compute, device))
    return load_scores(job.directory, SPLIT)
