"""Teacher cache benchmark, everything measured side by side in one run on the same batches:

(a) storage: bytes per token and per stored entry of RS-KD N = 12, 30, 50, 100 (our rANS codec,
    lossless) vs Top-K k = 12, 50 (ids + fp16 probs + fp16 tail) vs full fp16 logits;
(b) speed: the caching pass (decoder + chunked LM head + sampling + encoding) vs the bare teacher
    forward (full logits) on the same batches: the ratio;
(c) reader throughput (decode + pad into training batches) vs the training token rate of a
    ~45M-parameter student step (forward + backward + AdamW) on the same batches.

Run: .venv/bin/python benchmarks/cache_teacher.py [--sequences 48]  (after `dvc repro models prepare`)
Writes benchmarks/results/cache_teacher.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_result

from logitflow.cache.format import Shard, ShardTargets, encode_shard
from logitflow.cache.reader import TeacherCache
from logitflow.cache.shards import encode_tensors
from logitflow.cache.teacher_pass import _hidden_rows, compute_shard, run_cache_pass
from logitflow.compute import autocast
from logitflow.config import RskdSettings, load_params
from logitflow.ops.sparse_kd import rskd_sample
from logitflow.stages.cache_teacher import prepare_pass

ROOT = Path(__file__).resolve().parents[1]


def _batches(sequences, batch_size, pad_id):
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield ids, mask


def storage(model, job, device, ac) -> dict:
    """Bytes of sparse targets per token/entry for each setting, from the same hidden states."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(job.sequences), job.batch_size):
            with ac():
                rows.append(_hidden_rows(model, job.sequences[start : start + job.batch_size], job.pad_id, device))
    hidden = torch.cat(rows)
    lengths = np.array([len(s) for s in job.sequences])
    input_ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in job.sequences])
    positions = int((lengths - 1).sum())
    results = {}
    for n in (12, 30, 50, 100):
        generator = torch.Generator(device=device).manual_seed(0)
        k, ids, counts = [], [], []
        with torch.inference_mode():
            for chunk in hidden.split(job.sampling_chunk):
                with ac():
                    logits = model.get_output_embeddings()(chunk)
                targets = rskd_sample(logits, n, generator=generator)
                filled = targets.probs > 0
                k.append(filled.sum(-1).cpu())
                ids.append(targets.ids[filled].cpu())
                counts.append(targets.counts[filled].cpu())
        shard = Shard(
            input_ids,
            lengths,
            ShardTargets(torch.cat(k).numpy(), torch.cat(ids).numpy(), torch.cat(counts).numpy(), None, None, None),
        )
        _, info = encode_shard(shard, mode="rskd", n_samples=n, vocab_size=job.vocab_size)
        results[f"rskd_n{n}"] = {
            "unique_per_position": info["entries"] / positions,
            "bytes_per_token": info["target_bytes"] / positions,
            "bytes_per_entry": info["target_bytes"] / info["entries"],
            "lossless": True,
        }
    for k_top in (12, 50):
        per_token = k_top * (2 + 2) + 2  # uint16 ids + fp16 probs + fp16 tail mass
        results[f"topk_k{k_top}"] = {
            "unique_per_position": k_top,
            "bytes_per_token": per_token,
            "bytes_per_entry": per_token / k_top,
            "lossless": False,
        }
    results["full_fp16"] = {
        "unique_per_position": job.vocab_size,
        "bytes_per_token": 2 * job.vocab_size,
        "bytes_per_entry": 2.0,
        "lossless": False,
    }
    return results


def speed(model, job, device, ac, repeats: int) -> dict:
    def bare_forward():
        with torch.inference_mode():
            for ids, mask in _batches(job.sequences, job.batch_size, job.pad_id):
                with ac():
                    model(input_ids=ids.to(device), attention_mask=mask.to(device))

    whole = replace(job, sequences_per_shard=len(job.sequences))

    def caching_pass():
        shard = compute_shard(model, whole, 0, device, ac)
        tensors, _ = encode_shard(shard, mode="rskd", n_samples=job.rskd.n_samples, vocab_size=job.vocab_size)
        encode_tensors(tensors, {"benchmark": True})

    bare_forward()  # warm-up (allocator, kernels)
    forward_s, cache_s = [], []
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        forward_s.append(median_seconds(bare_forward, 1))
        cache_s.append(median_seconds(caching_pass, 1))
    tokens = sum(map(len, job.sequences))
    forward, cache = float(np.median(forward_s)), float(np.median(cache_s))
    return {
        "tokens": tokens,
        "bare_forward_s": forward,
        "caching_pass_s": cache,
        "ratio_cache_to_forward": cache / forward,
        "bare_forward_tok_s": tokens / forward,
        "caching_pass_tok_s": tokens / cache,
    }


def reader_vs_student(model, job, device, ac, params) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        cache_job = replace(job, directory=Path(tmp) / "cache", key={"bench": True})
        run_cache_pass(model, cache_job, device, ac)
        reader = TeacherCache(cache_job.directory)
        indices = list(range(len(reader)))
        start = time.perf_counter()
        for first in range(0, len(indices), 8):
            reader.batch(indices[first : first + 8], pad_id=job.pad_id)
        reader_s = time.perf_counter() - start
        tokens = reader.manifest.tokens
        batch = reader.batch(indices[:8], pad_id=job.pad_id)

    config = LlamaConfig(
        vocab_size=job.vocab_size,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    student = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)

    def step():
        with ac():
            loss = student(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    step_s = median_seconds(step, 3)
    student_tok_s = int(mask.sum()) / step_s
    reader_tok_s = tokens / reader_s
    return {
        "reader_tok_s": reader_tok_s,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "student_train_tok_s": student_tok_s,
        "ratio_reader_to_student": reader_tok_s / student_tok_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=48, help="corpus sequences to use (of data.max_length tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    prepared = prepare_pass(params, ROOT, "rskd")
    job = replace(prepared.job, sequences=prepared.job.sequences[: args.sequences], rskd=RskdSettings(n_samples=50))
    model, device = prepared.model, prepared.device
    ac = lambda: autocast(params.compute, device)  # noqa: E731
    result = {
        "setup": {
            "sequences": len(job.sequences),
            "max_length": params.data.max_length,
            "batch_size": job.batch_size,
            "precision": params.compute.precision,
            "device": device.type,
        },
        "storage": storage(model, job, device, ac),
        "speed": speed(model, job, device, ac, args.repeats),
        "reader": reader_vs_student(model, job, device, ac, params),
    }
    path = write_result("cache_teacher", result)
    print(f"wrote {path}")
    for name, row in result["storage"].items():
        print(
            f"  {name:10s} {row['unique_per_position']:8.1f} ids/pos {row['bytes_per_token']:10.1f} B/token "
            f"{row['bytes_per_entry']:6.3f} B/entry"
        )
    speed_row, reader_row = result["speed"], result["reader"]
    print(
        f"  caching pass / bare forward: {speed_row['ratio_cache_to_forward']:.3f} "
        f"({speed_row['caching_pass_tok_s']:.0f} vs {speed_row['bare_forward_tok_s']:.0f} tok/s)"
    )
    print(
        f"  reader {reader_row['reader_tok_s']:.0f} tok/s vs student training "
        f"{reader_row['student_train_tok_s']:.0f} tok/s: {reader_row['ratio_reader_to_student']:.0f}x"
    )


if __name__ == "__main__":
    main()
