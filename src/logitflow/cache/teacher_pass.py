"""The teacher caching pass: shard by shard, resumable, deterministic.

A shard (a fixed slice of the sequence list) is an independent unit of work: its random draws come
from its own seed, so a shard computed after a restart, or on another worker, has the same bytes.
Complete shards of the same cache key are reused; the manifest is removed at the start and written
last, so an interrupted pass never looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitflow.cache.format import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SHARD_COUNTS,
    Manifest,
    Mode,
    Shard,
    ShardTargets,
    encode_shard,
    read_manifest,
    write_manifest,
)
from logitflow.cache.shards import CacheError, ShardedPass, ShardExecutor, key_digest, run_sharded
from logitflow.config import RskdSettings, TopkSettings
from logitflow.data.tokenize import pad_right
from logitflow.ops.sparse_kd import rskd_sample, topk_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheJob:
    directory: Path
    mode: Mode
    key: dict[str, Any]
    sequences: list[list[int]]
    sequences_per_shard: int
    batch_size: int
    sampling_chunk: int
    seed: int
    rskd: RskdSettings
    topk: TopkSettings
    vocab_size: int
    pad_id: int

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.sequences) / self.sequences_per_shard)

    def shard_sequences(self, index: int) -> list[list[int]]:
        start = index * self.sequences_per_shard
        return self.sequences[start : start + self.sequences_per_shard]


def shard_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"logitflow-shard:{seed}:{index}".encode()).digest()[:7], "little")


def _hidden_rows(model: torch.nn.Module, batch: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Last hidden states of rows 0..L-2 of every sequence, sequence-major: [Σ(L−1), H]."""
    input_ids, mask = pad_right(batch, pad_id)
    hidden = model.get_decoder()(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    keep = mask.clone()
    keep[torch.arange(len(batch)), mask.sum(1) - 1] = 0  # the last token has no next token in the chunk
    return hidden[keep.bool().to(device)]


def compute_shard(
    model: torch.nn.Module,
    job: CacheJob,
    index: int,
    device: torch.device,
    autocast: Callable[[], Any],
    on_tokens: Callable[[int], None] = lambda n: None,
) -> Shard:
    sequences = job.shard_sequences(index)
    generator = torch.Generator(device=device).manual_seed(shard_seed(job.seed, index))
    lm_head = model.get_output_embeddings()
    num_unique, ids, counts, weights, probs, tails = [], [], [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(sequences), job.batch_size):
            batch = sequences[start : start + job.batch_size]
            with autocast():
                rows = _hidden_rows(model, batch, job.pad_id, device)
            for chunk in rows.split(job.sampling_chunk):
                with autocast():
                    logits = lm_head(chunk)
                if job.mode == "rskd":
                    targets = rskd_sample(
                        logits,
                        job.rskd.n_samples,
                        temperature=job.rskd.temperature,
                        proposal_power=job.rskd.proposal_power,
                        generator=generator,
                    )
                    filled = targets.probs > 0
                    num_unique.append(filled.sum(-1).cpu())
                    ids.append(targets.ids[filled].cpu())
                    assert targets.counts is not None
                    counts.append(targets.counts[filled].cpu())
                    weights.append(targets.probs[filled].cpu())
                else:
                    targets = topk_targets(logits, job.topk.k, temperature=job.topk.temperature, tail="ghost")
                    ids.append(targets.ids[:, :-1].cpu())
                    probs.append(targets.probs[:, :-1].cpu())
                    tails.append(targets.probs[:, -1].cpu())
            on_tokens(sum(map(len, batch)))
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    input_ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
    cat = lambda parts: torch.cat(parts).numpy() if parts else None  # noqa: E731
    exact = job.mode == "rskd" and job.rskd.proposal_power == 1.0
    shard_targets = ShardTargets(
        num_unique=cat(num_unique) if num_unique else np.full(int((lengths - 1).sum()), job.topk.k),
        ids=cat(ids),
        counts=cat(counts),
        weights=None if exact or job.mode != "rskd" else cat(weights),
        topk_probs=cat(probs),
        tail=cat(tails),
    )
    return Shard(input_ids, lengths, shard_targets)


def run_cache_pass(
    model: torch.nn.Module | None,
    job: CacheJob,
    device: torch.device,
    autocast: Callable[[], Any],
    executor: ShardExecutor | None = None,
) -> tuple[Manifest, dict[str, float]]:
    """Compute (or resume) every shard, then write the manifest. Returns it and pass statistics.
    With an `executor` (Ray workers) the shards are computed there and `model` may be None."""
    key_sha256 = key_digest(job.key)
    try:
        manifest = read_manifest(job.directory)
        if manifest.key_sha256 == key_sha256 and all((job.directory / s.file).is_file() for s in manifest.shards):
            log.info("cache_teacher: %s is complete and up to date", job.directory)
            return manifest, {"computed_units": 0, "seconds": 0.0}
    except CacheError:
        pass

    def compute(index: int, advance: Callable[[int], None]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        assert model is not None, "in-process shards need the model"
        shard = compute_shard(model, job, index, device, autocast, on_tokens=advance)
        return encode_shard(shard, mode=job.mode, n_samples=job.rskd.n_samples, vocab_size=job.vocab_size)

    sharded = ShardedPass(
        directory=job.directory,
        key_sha256=key_sha256,
        schema_version=SCHEMA_VERSION,
        num_shards=job.num_shards,
        total_units=sum(map(len, job.sequences)),
        unit="tok",
        description=f"cache_teacher@{job.mode}",
        compute=compute,
        inputs=job.shard_sequences,
    )
    entries, stats = run_sharded(sharded, MANIFEST_FILE, executor)
    totals = {name: sum(entry.counts[name] for entry in entries) for name in SHARD_COUNTS}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        mode=job.mode,
        key=job.key,
        key_sha256=key_sha256,
        vocab_size=job.vocab_size,
        n_samples=job.rskd.n_samples if job.mode == "rskd" else 0,
        bytes=sum(entry.bytes for entry in entries),
        shards=entries,
        **totals,
    )
    write_manifest(job.directory, manifest)
    return manifest, stats
