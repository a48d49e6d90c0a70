"""One labelling session: the ActiveSelector over the scored pool, replayed from the labels on disk.

Opening a session replays every recorded answer in order (labels enter the design and trigger the
same θ̂ refits at 1, 2, 4, 8, ... labels; skips leave the pool), so a restarted session is in the
state the last one stopped in and never asks about a pair twice. An answer is written to the store
before the selector takes it, so the disk is never behind what a person was shown as done.

Files in `paths.feedback`/<session>/: session.json (what the labels were collected on, and the
MLflow run that tracks the session), labels.jsonl (the answers), dataset/ (the export).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from logitflow.cache.ref_scores import PairScores
from logitflow.config import Params
from logitflow.data.pool import Pool
from logitflow.errors import DataError
from logitflow.feedback.labels import Answer, LabelRecord, LabelStore
from logitflow.fsio import atomic_directory, atomic_write_json
from logitflow.ops.active_dpo import ActiveSelector, SelectionSettings

LABELS_FILE = "labels.jsonl"
SESSION_FILE = "session.json"
DATASET_DIR = "dataset"
PREFERENCES_FILE = "preferences.jsonl"


class SessionInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session: str
    pool_fingerprint: str
    pool_rows: int
    mlflow_run_id: str | None = None


@dataclass(frozen=True)
class Question:
    number: int  # 1-based, skips included
    row: int
    pair_id: str
    prompt: list[dict[str, str]]
    response_a: str
    response_b: str
    gain: float  # log det gain if labelled: the largest of the `remaining` pairs
    logdet: float  # log det of the design before this question
    labels: int  # labels so far
    remaining: int  # pairs never asked about, this one included

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def session_dir(params: Params, root: Path) -> Path:
    return root / params.paths.feedback / params.feedback.session


def selection_settings(params: Params) -> SelectionSettings:
    section = params.select
    return SelectionSettings(
        beta=params.dpo.beta, gamma_rel=section.gamma_rel, alpha=section.alpha, l2=section.l2, seed=section.seed
    )


class FeedbackSession:
    def __init__(self, directory: Path, name: str, pool: Pool, scores: PairScores, settings: SelectionSettings):
        if len(scores) != len(pool):
            raise DataError(f"{directory}: {len(scores)} scored pairs for a pool of {len(pool)}; rescore the pool")
        self.directory, self.pool = directory, pool
        self.store = LabelStore(directory / LABELS_FILE)
        self.info = self._check_info(SessionInfo(session=name, pool_fingerprint=pool.fingerprint, pool_rows=len(pool)))
        features = (scores.chosen_features - scores.rejected_features).to(torch.float64)
        offsets = (scores.chosen_logp - scores.rejected_logp).to(torch.float64)
        self.selector = ActiveSelector(features, offsets, settings)
        self.records: list[LabelRecord] = []
        for record in self.store.read():
            self._replay(record)

    # ------------------------------------------------------------ state
    @property
    def labels(self) -> int:
        return len(self.selector.labelled)

    @property
    def logdet(self) -> float:
        return float(self.selector.design.logdet)

    def next_question(self) -> Question | None:
        """The most informative pair not asked about yet (None when every pair has been asked)."""
        if self.selector.remaining == 0:
            return None
        row, gain = self.selector.propose()
        pair = self.pool.pairs[row]
        return Question(
            number=len(self.records) + 1,
            row=row,
            pair_id=pair["id"],
            prompt=pair["prompt"],
            response_a=pair["response_a"],
            response_b=pair["response_b"],
            gain=gain,
            logdet=self.logdet,
            labels=self.labels,
            remaining=self.selector.remaining,
        )

    # ------------------------------------------------------------ answers
    def answer(self, question: Question, answer: Answer, *, annotator: str = "", flow_run_id: str = "") -> LabelRecord:
        """Store the answer (fsynced), then let the selector take it."""
        if question.number != len(self.records) + 1 or not bool(self.selector.design.available[question.row]):
            raise DataError(f"question {question.number} (pair '{question.pair_id}') is not the open question")
        labelled = answer != "skip"
        labels = self.labels + labelled
        record = LabelRecord(
            question=question.number,
            row=question.row,
            pair_id=question.pair_id,
            answer=answer,
            gain=question.gain,
            logdet=question.logdet + (question.gain if labelled else 0.0),
            labels=labels,
            refit=labelled and labels & (labels - 1) == 0,
            annotator=annotator,
            flow_run_id=flow_run_id,
        )
        self.store.append(record)
        self._apply(record)
        return record

    def _replay(self, record: LabelRecord) -> None:
        where = f"{self.store.path} question {record.question}"
        if not 0 <= record.row < len(self.pool) or self.pool.pairs[record.row]["id"] != record.pair_id:
            raise DataError(f"{where}: pair '{record.pair_id}' is not row {record.row} of this pool")
        if not bool(self.selector.design.available[record.row]):
            raise DataError(f"{where}: pair '{record.pair_id}' was already answered earlier in the file")
        self._apply(record)

    def _apply(self, record: LabelRecord) -> None:
        if record.answer == "skip":
            self.selector.skip(record.row)
        else:
            self.selector.label(record.row, preferred_first=record.answer == "a")
        self.records.append(record)

    # ------------------------------------------------------------ session file and export
    def _check_info(self, expected: SessionInfo) -> SessionInfo:
        path = self.directory / SESSION_FILE
        if not path.is_file():
            if self.store.path.is_file():
                raise DataError(f"{self.store.path}: labels without {SESSION_FILE}; cannot tell which pool they label")
            atomic_write_json(path, expected.model_dump())
            return expected
        info = SessionInfo.model_validate_json(path.read_text())
        if (info.pool_fingerprint, info.pool_rows) != (expected.pool_fingerprint, expected.pool_rows):
            raise DataError(
                f"{path}: session '{info.session}' labels pool {info.pool_fingerprint[:12]} ({info.pool_rows} pairs), "
                f"but the pool is now {expected.pool_fingerprint[:12]} ({expected.pool_rows} pairs); "
                "set feedback.session to a new name for a new pool"
            )
        return info

    def remember_run(self, run_id: str) -> None:
        self.info.mlflow_run_id = run_id
        atomic_write_json(self.directory / SESSION_FILE, self.info.model_dump())

    def export(self) -> Path:
        """<session>/dataset/: preferences.jsonl (prompt, chosen, rejected; skips left out) and a copy
        of the answers, replaced as a whole (never modified in place, so DVC can link it)."""
        rows = []
        for record in self.records:
            if record.answer == "skip":
                continue
            pair = self.pool.pairs[record.row]
            first, second = pair["response_a"], pair["response_b"]
            chosen, rejected = (first, second) if record.answer == "a" else (second, first)
            rows.append({"id": pair["id"], "prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
        target = self.directory / DATASET_DIR
        with atomic_directory(target) as tmp:
            preferences = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (tmp / PREFERENCES_FILE).write_text(preferences, encoding="utf-8")
            (tmp / LABELS_FILE).write_text("".join(r.model_dump_json() + "\n" for r in self.records), encoding="utf-8")
        return target / PREFERENCES_FILE


def open_session(params: Params, root: Path, pool: Pool, scores: PairScores) -> FeedbackSession:
    return FeedbackSession(session_dir(params, root), params.feedback.session, pool, scores, selection_settings(params))
