"""Reference-policy scores of preference pairs, for DPO (reference log-probs) and for the design
(last-layer features).

For each pair (prompt, chosen, rejected) of the train and held-out splits: the summed and
per-token log-probs of each response under the reference policy, and each response's last-layer
feature φ(x, y) (last token, or mean over response tokens). The LM head runs only at response
positions. Shards, resume and checksums come from `shards.py`; the manifest is written last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors

from logitflow.cache.shards import (
    CacheError,
    ShardedPass,
    ShardEntry,
    ShardExecutor,
    key_digest,
    read_checked,
    read_manifest_file,
    run_sharded,
)
from logitflow.data.tokenize import TokenizedPair, pad_right
from logitflow.fsio import atomic_write_json

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
Pooling = Literal["last", "mean"]
SIDES = ("chosen", "rejected")


class ScoresManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int
    key: dict[str, Any]
    key_sha256: str
    splits: dict[str, tuple[int, int]]  # split -> (first row, rows); JSON keys are sorted, so explicit
    hidden_size: int
    truncated: int
    shards: list[ShardEntry]


@dataclass(frozen=True)
class ScoreJob:
    directory: Path
    key: dict[str, Any]
    pairs: Sequence[tuple[TokenizedPair, TokenizedPair]]  # (chosen, rejected); sliced one shard at a time
    splits: dict[str, tuple[int, int]]
    pairs_per_shard: int
    batch_pairs: int
    pooling: Pooling
    pad_id: int

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.pairs) / self.pairs_per_shard)


def score_sequences(
    model: torch.nn.Module, sequences: list[TokenizedPair], pad_id: int, device: torch.device, pooling: Pooling
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(summed response log-probs [B], per-token log-probs (one [R_b] per sequence), features [B, H]).
    Token r of a response is predicted by the hidden state at r − 1; the LM head sees only those rows."""
    input_ids, mask = pad_right([s.input_ids for s in sequences], pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    rows, targets, owners, features = [], [], [], []
    for row, sequence in enumerate(sequences):
        start, end = sequence.prompt_length, len(sequence.input_ids)
        rows.append(hidden[row, start - 1 : end - 1])
        targets.append(input_ids[row, start:end])
        owners.append(torch.full((end - start,), row, device=device))
        pooled = hidden[row, end - 1] if pooling == "last" else hidden[row, start:end].float().mean(0)
        features.append(pooled.float())
    logits = model.get_output_embeddings()(torch.cat(rows)).float()
    token_logps = logits.log_softmax(-1).gather(-1, torch.cat(targets)[:, None]).squeeze(-1)
    sums = torch.zeros(len(sequences), device=device).index_add_(0, torch.cat(owners), token_logps)
    lengths = [len(s.input_ids) - s.prompt_length for s in sequences]
    return sums, list(token_logps.split(lengths)), torch.stack(features)


def compute_score_shard(
    model: torch.nn.Module,
    job: ScoreJob,
    index: int,
    device: torch.device,
    autocast: Callable[[], Any],
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    first = index * job.pairs_per_shard
    pairs = job.pairs[first : first + job.pairs_per_shard]
    sums: dict[str, list] = {side: [] for side in SIDES}
    tokens: dict[str, list] = {side: [] for side in SIDES}
    features: dict[str, list] = {side: [] for side in SIDES}
    with torch.inference_mode():
        for start in range(0, len(pairs), job.batch_pairs):
            batch = pairs[start : start + job.batch_pairs]
            sequences = [pair[0] for pair in batch] + [pair[1] for pair in batch]
            with autocast():
                batch_sums, batch_tokens, batch_features = score_sequences(
                    model, sequences, job.pad_id, device, job.pooling
                )
            for side, part in zip(SIDES, (slice(0, len(batch)), slice(len(batch), None)), strict=True):
                sums[side].append(batch_sums[part].cpu())
                tokens[side].extend(t.cpu() for t in batch_tokens[part])
                features[side].append(batch_features[part].cpu())
            advance(len(batch))
    tensors: dict[str, np.ndarray] = {"pair_row": np.arange(first, first + len(pairs), dtype=np.int64)}
    for side in SIDES:
        tensors[f"{side}_logp"] = torch.cat(sums[side]).numpy().astype(np.float32)
        tensors[f"{side}_token_logps"] = torch.cat(tokens[side]).numpy().astype(np.float32)
        tensors[f"{side}_lengths"] = np.array([len(t) for t in tokens[side]], dtype=np.int32)
        tensors[f"{side}_features"] = torch.cat(features[side]).numpy().astype(np.float32)
    truncated = np.array([pair[0].truncated or pair[1].truncated for pair in pairs], dtype=np.uint8)
    tensors["truncated"] = truncated
    return tensors, {"pairs": len(pairs), "units": len(pairs), "truncated": int(truncated.sum())}


def run_score_pass(
    model: torch.nn.Module | None,
    job: ScoreJob,
    device: torch.device,
    autocast: Callable[[], Any],
    executor: ShardExecutor | None = None,
) -> tuple[ScoresManifest, dict[str, float]]:
    """Compute (or resume) every shard, then write the manifest. With an `executor` (Ray workers)
    the shards are computed there and `model` may be None."""
    key_sha256 = key_digest(job.key)
    try:
        manifest = read_scores_manifest(job.directory)
        if manifest.key_sha256 == key_sha256 and all((job.directory / s.file).is_file() for s in manifest.shards):
            return manifest, {"computed_units": 0, "seconds": 0.0}
    except CacheError:
        pass
    sharded = ShardedPass(
        directory=job.directory,
        key_sha256=key_sha256,
        schema_version=SCHEMA_VERSION,
        num_shards=job.num_shards,
        total_units=len(job.pairs),
        unit="pair",
        description="score_prefs",
        compute=lambda index, advance: compute_score_shard(model, job, index, device, autocast, advance),
        inputs=lambda index: job.pairs[index * job.pairs_per_shard : (index + 1) * job.pairs_per_shard],
    )
    entries, stats = run_sharded(sharded, MANIFEST_FILE, executor)
    if model is not None:
        hidden_size = int(model.get_output_embeddings().weight.shape[1])
    elif entries:  # the shards were computed elsewhere: their features say it
        with safe_open(str(job.directory / entries[0].file), framework="numpy") as handle:
            hidden_size = int(handle.get_slice("chosen_features").get_shape()[1])
    else:
        hidden_size = 0
    manifest = ScoresManifest(
        schema_version=SCHEMA_VERSION,
        key=job.key,
        key_sha256=key_sha256,
        splits=job.splits,
        hidden_size=hidden_size,
        truncated=sum(entry.counts["truncated"] for entry in entries),
        shards=entries,
    )
    atomic_write_json(job.directory / MANIFEST_FILE, manifest.model_dump(mode="json"))
    return manifest, stats


def read_scores_manifest(directory: Path) -> ScoresManifest:
    missing = f"{directory}: no complete reference scores here; run `logitflow stage score_prefs`"
    return read_manifest_file(directory / MANIFEST_FILE, ScoresManifest, missing)


@dataclass(frozen=True)
class PairScores:
    """Scores of one split, row-aligned with its prepared dataset."""

    chosen_logp: torch.Tensor  # [N]
    rejected_logp: torch.Tensor  # [N]
    chosen_features: torch.Tensor  # [N, H]
    rejected_features: torch.Tensor  # [N, H]
    chosen_token_logps: list[torch.Tensor]
    rejected_token_logps: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.chosen_logp)


def load_scores(directory: Path, split: str, *, expect: dict[str, Any] | None = None) -> PairScores:
    """The scores of `split` ('train' or 'heldout'). `expect` holds key entries the consumer
    requires (model/tokenizer hashes, max_length, data fingerprints): any difference is refused."""
    manifest = read_scores_manifest(directory)
    for name, value in (expect or {}).items():
        if manifest.key.get(name) != value:
            raise CacheError(
                f"{directory}: reference scores were made with {name} = {str(manifest.key.get(name))[:24]!r}, "
                f"but this run needs {str(value)[:24]!r}; rerun score_prefs"
            )
    if split not in manifest.splits:
        raise CacheError(f"{directory}: no split '{split}' (splits: {', '.join(manifest.splits)})")
    first, count = manifest.splits[split]
    rows = range(first, first + count)
    parts: dict[str, list] = {}
    for entry in manifest.shards:
        tensors = load_safetensors(read_checked(directory, entry))
        keep = (tensors["pair_row"] >= rows.start) & (tensors["pair_row"] < rows.stop)
        if not keep.any():
            continue
        for side in SIDES:
            lengths = tensors[f"{side}_lengths"]
            split_tokens = np.split(tensors[f"{side}_token_logps"], np.cumsum(lengths)[:-1])
            parts.setdefault(f"{side}_token_logps", []).extend(
                torch.from_numpy(t.copy()) for t, k in zip(split_tokens, keep, strict=True) if k
            )
            for name in (f"{side}_logp", f"{side}_features"):
                parts.setdefault(name, []).append(torch.from_numpy(tensors[name][keep]))
    return PairScores(
        torch.cat(parts["chosen_logp"]),
        torch.cat(parts["rejected_logp"]),
        torch.cat(parts["chosen_features"]),
        torch.cat(parts["rejected_features"]),
        parts["chosen_token_logps"],
        parts["rejected_token_logps"],
    )
