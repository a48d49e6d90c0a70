"""The label store of one feedback session: an append-only JSON Lines file.

Each answer is one line, written with a single append and fsynced before the next question is
asked, so a crash or a closed browser loses nothing that was answered. A crash in the middle of a
write can leave only the last line torn (no newline, or not JSON): readers ignore it and the next
append cuts it off. A broken line anywhere else is corruption and is refused with its line number.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from logitflow.errors import DataError

Answer = Literal["a", "b", "skip"]


class LabelRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    question: int  # 1-based, skips included
    row: int  # pool row
    pair_id: str
    answer: Answer
    gain: float  # log det gain the pair was chosen for (the largest in the pool when asked)
    logdet: float  # log det of the design after this answer
    labels: int  # a/b answers so far, this one included
    refit: bool  # θ̂ was refit after this answer (label counts 1, 2, 4, 8, ...)
    annotator: str = ""
    flow_run_id: str = ""


class LabelStore:
    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[LabelRecord]:
        records, _ = self._scan()
        return records

    def append(self, record: LabelRecord) -> None:
        _, valid_bytes = self._scan()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            if handle.tell() > valid_bytes:
                handle.truncate(valid_bytes)  # a torn last line from a crash mid-write
            handle.write((record.model_dump_json() + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    def _scan(self) -> tuple[list[LabelRecord], int]:
        """The complete records and the byte length they span. Every append ends with a newline,
        so bytes after the last newline can only be a write torn by a crash."""
        if not self.path.is_file():
            return [], 0
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        records = []
        for number, line in enumerate(complete.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(LabelRecord.model_validate_json(line))
            except ValidationError as err:
                raise DataError(f"{self.path} line {number}: not a label record ({err.errors()[0]['msg']})") from None
        return records, len(complete)
