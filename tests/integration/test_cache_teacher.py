"""The cache_teacher stage on a tiny teacher: exact round trip, resume, refusals."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from logitflow.cache import shards
from logitflow.cache.format import MANIFEST_FILE, decode_shard, read_manifest
from logitflow.cache.reader import TeacherCache
from logitflow.cache.shards import CacheError
from logitflow.cache.teacher_pass import compute_shard
from logitflow.compute import autocast
from logitflow.config import load_params
from logitflow.errors import DataError
from logitflow.models import read_model_card
from logitflow.stages import cache_teacher
from tests.conftest import set_params


def _run(root: Path, mode: str = "rskd") -> dict:
    return cache_teacher.run(load_params(root / "params.yaml"), root, mode)


def test_rskd_cache_equals_direct_computation(prepared_project: Path) -> None:
    metrics = _run(prepared_project)
    params = load_params(prepared_project / "params.yaml")
    prepared = cache_teacher.prepare_pass(params, prepared_project, "rskd")
    job = prepared.job
    manifest = read_manifest(job.directory)
    assert manifest.sequences == len(job.sequences) == metrics["sequences"]
    assert manifest.shards[0].counts["sequences"] == 32 and len(manifest.shards) == job.num_shards > 2
    assert metrics["bytes_per_entry"] == round(manifest.bytes_per_entry, 4) < 2.0

    for index in (0, job.num_shards - 1):
        direct = compute_shard(
            prepared.model, job, index, prepared.device, lambda: autocast(params.compute, prepared.device)
        )
        stored = decode_shard(
            (job.directory / manifest.shards[index].file).read_bytes(),
            mode="rskd",
            n_samples=16,
            vocab_size=job.vocab_size,
            origin="test",
        )
        np.testing.assert_array_equal(stored.input_ids, direct.input_ids)
        np.testing.assert_array_equal(stored.targets.num_unique, direct.targets.num_unique)
        np.testing.assert_array_equal(stored.targets.ids, direct.targets.ids)
        np.testing.assert_array_equal(stored.targets.counts, direct.targets.counts)

    reader = TeacherCache(job.directory)
    for index in (0, 5, len(reader) - 1):
        ids, (target_ids, target_probs) = reader.sequence(index)
        assert ids.tolist() == job.sequences[index]
        assert target_ids.shape[0] == len(ids) - 1
        np.testing.assert_allclose(target_probs.sum(-1), 1.0, atol=1e-6)
        assert np.all((target_probs * 16) == np.round(target_probs * 16)), "probs are exact counts / N"
    batch = reader.batch([0, 3, 9], pad_id=0)
    assert batch.input_ids.shape[0] == 3 and batch.targets.ids.shape[:2] == (3, batch.input_ids.shape[1] - 1)
    valid_rows = batch.attention_mask[:, 1:].bool()
    assert torch.allclose(batch.targets.probs.sum(-1)[valid_rows], torch.tensor(1.0))
    assert (batch.targets.probs.sum(-1)[~valid_rows] == 0).all()


def test_topk_cache_keeps_head_and_tail(prepared_project: Path) -> None:
    _run(prepared_project, "topk")
    reader = TeacherCache(
        cache_teacher.cache_dir(load_params(prepared_project / "params.yaml"), prepared_project, "topk")
    )
    ids, (head_ids, head_probs, tail) = reader.sequence(1)
    assert head_ids.shape == (len(ids) - 1, 5)
    assert np.all(np.diff(head_probs, axis=-1) <= 0), "head sorted by probability"
    np.testing.assert_allclose(head_probs.sum(-1) + tail, 1.0, atol=5e-3)  # fp16 storage
    assert reader.batch([0, 1]).tail is not None


def test_rerun_is_a_no_op_and_changed_params_rebuild(prepared_project: Path) -> None:
    _run(prepared_project)
    directory = prepared_project / "cache/teacher_rskd"
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert _run(prepared_project)["tokens_per_second"] == 0.0
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    old_key = read_manifest(directory).key_sha256

    set_params(prepared_project, **{"cache_teacher.rskd.n_samples": 8})
    _run(prepared_project)
    manifest = read_manifest(directory)
    assert manifest.key_sha256 != old_key and manifest.key["sampling"]["n_samples"] == 8
    assert all((directory / s.file).stat().st_mtime_ns != before[s.file] for s in manifest.shards)


def test_reader_refuses_mismatches_and_corruption(prepared_project: Path) -> None:
    _run(prepared_project)
    directory = prepared_project / "cache/teacher_rskd"
    card = read_model_card(prepared_project / "models/teacher")
    TeacherCache(directory, expect_tokenizer_sha256=card["tokenizer_sha256"], expect_vocab_size=card["vocab_size"])
    with pytest.raises(CacheError, match="made with tokenizer .* the student's tokenizer is 000000000000"):
        TeacherCache(directory, expect_tokenizer_sha256="0" * 64)
    with pytest.raises(CacheError, match=f"teacher vocabulary has {card['vocab_size']} ids, the student's has 7"):
        TeacherCache(directory, expect_vocab_size=7)

    shard = directory / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = TeacherCache(directory)
    reader.sequence(0)  # shard 0 is intact
    with pytest.raises(CacheError, match="shard-00001.safetensors: checksum mismatch"):
        reader.sequence(40)

    (directory / MANIFEST_FILE).unlink()
    with pytest.raises(CacheError, match="incomplete cache"):
        TeacherCache(directory)


def test_write_error_keeps_finished_shards_and_resumes(prepared_project: Path, monkeypatch) -> None:
    real_write = shards.atomic_write_bytes
    calls = {"n": 0}

    def failing_write(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(shards, "atomic_write_bytes", failing_write)
    with pytest.raises(CacheError, match=r"shard-00001.safetensors: cannot write shard \(No space left on device\)"):
        _run(prepared_project)
    directory = prepared_project / "cache/teacher_rskd"
    assert [p.name for p in directory.iterdir()] == ["shard-00000.safetensors"]
    first = (directory / "shard-00000.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(shards, "atomic_write_bytes", real_write)
    _run(prepared_project)
    assert (directory / "shard-00000.safetensors").stat().st_mtime_ns == first, "finished shard reused"
    assert json.loads((directory / MANIFEST_FILE).read_text())["sequences"] > 32


def test_empty_corpus_is_refused_before_any_teacher_pass(prepared_project: Path) -> None:
    from logitflow.stages import prepare

    (prepared_project / "empty.jsonl").write_text("\n")
    set_params(prepared_project, **{"prepare.corpus": {"type": "local", "path": "empty.jsonl"}})
    with pytest.raises(DataError, match="empty.jsonl: no usable corpus rows"):
        prepare.run(load_params(prepared_project / "params.yaml"), prepared_project)
    assert not (prepared_project / "cache").exists()


def test_max_length_beyond_the_teacher_context_is_clipped_and_recorded(prepared_project: Path) -> None:
    set_params(prepared_project, **{"data.max_length": 4096})  # the tiny teacher's context is 512
    metrics = _run(prepared_project)
    manifest = read_manifest(prepared_project / "cache/teacher_rskd")
    assert manifest.key["max_length"] == 512
    assert metrics["documents_split"] >= 1, "documents longer than the context are chunked and counted"
