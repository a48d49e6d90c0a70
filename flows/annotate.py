"""Answer a running `feedback` flow through Prefect's API, as a person would in the UI.

    python -m flows.annotate [<flow-run-id>] --oracle answer-key   # the demo answer key labels
    python -m flows.annotate [<flow-run-id>] --oracle first        # always "a" (a smoke test)

Without an id, the newest running feedback flow run is answered.

Each open question is read from the flow run (its pause key names a flow-run input holding the
pair), an oracle picks a, b or skip, and `resume_flow_run(flow_run_id, run_input=...)` answers it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import resume_flow_run
from prefect.input import read_flow_run_input

from logitflow.errors import LogitflowError
from logitflow.evaluation.answers import answer_found

Oracle = Callable[[dict[str, Any]], str]


def open_question(flow_run_id: UUID | str, timeout_s: float = 120.0, poll_s: float = 0.2) -> dict[str, Any] | None:
    """The question the flow run is paused on (waiting until it pauses and its form is saved), or
    None once the run has finished."""
    run_id = parse_run_id(flow_run_id)
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                state = client.read_flow_run(run_id).state
            except ObjectNotFound:
                raise LogitflowError(f"flow run {run_id}: not found on {client.api_url}") from None
            if state is not None and state.is_final():
                return None
            details = state.state_details if state is not None else None
            if state is not None and state.is_paused() and details and details.run_input_keyset:
                schema_saved = read_flow_run_input(details.run_input_keyset["schema"], run_id) is not None
                question = read_flow_run_input(str(details.pause_key), run_id)
                if schema_saved and question is not None:
                    return question
            time.sleep(poll_s)
    raise LogitflowError(f"flow run {flow_run_id}: no question within {timeout_s:.0f} s (is it a feedback flow run?)")


def parse_run_id(flow_run_id: UUID | str) -> UUID:
    try:
        return UUID(str(flow_run_id))
    except ValueError:
        raise LogitflowError(f"'{flow_run_id}' is not a flow run id (a UUID, as the Prefect UI shows)") from None


def find_open_run(exclude: Collection[UUID] = (), timeout_s: float = 120.0) -> UUID:
    """The newest `feedback` flow run that is running or paused (waiting for a person)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["feedback"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PAUSED]))
                ),
                sort=FlowRunSort.START_TIME_DESC,
            )
            for run in runs:
                if run.id not in exclude:
                    return run.id
            time.sleep(0.2)
    raise LogitflowError(f"no running feedback flow run found within {timeout_s:.0f} s")


def answer(flow_run_id: UUID | str, answer: str, *, stop: bool = False, annotator: str = "") -> None:
    resume_flow_run(parse_run_id(flow_run_id), run_input={"answer": answer, "stop": stop, "annotator": annotator})


def answer_key_oracle(key: dict[str, str]) -> Oracle:
    """Prefer the response that states the correct answer; skip when both or neither do."""

    def label(question: dict[str, Any]) -> str:
        correct = key.get(question["pair_id"])
        if correct is None:
            raise LogitflowError(f"pair '{question['pair_id']}' is not in the answer key")
        a, b = answer_found(question["response_a"], correct), answer_found(question["response_b"], correct)
        return "a" if a and not b else "b" if b and not a else "skip"

    return label


def annotate(flow_run_id: UUID | str, oracle: Oracle, *, name: str = "script", timeout_s: float = 120.0) -> list[str]:
    """Answer every question of a feedback flow run until it finishes; returns the answers given."""
    given, last = [], None
    while (question := open_question(flow_run_id, timeout_s)) is not None:
        if question["number"] == last:  # the resume has not landed yet
            time.sleep(0.2)
            continue
        choice = oracle(question)
        answer(flow_run_id, choice, annotator=name)
        given.append(choice)
        last = question["number"]
    return given


def main() -> None:
    import argparse
    from pathlib import Path

    from logitflow.config import load_params
    from logitflow.stages.pool import read_answer_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flow_run_id", nargs="?", help="default: the newest running feedback flow run")
    parser.add_argument("--oracle", choices=["answer-key", "first"], default="answer-key")
    parser.add_argument("--project", default=".")
    args = parser.parse_args()
    if args.oracle == "answer-key":
        params = load_params(Path(args.project) / "params.yaml")
        key = read_answer_key(params, Path(args.project))
        if not key:
            raise SystemExit(f"{params.paths.pool}: no answer key (only the demo pool has one); use --oracle first")
        oracle = answer_key_oracle(key)
    else:
        oracle = lambda question: "a"  # noqa: E731
    try:
        answers = annotate(args.flow_run_id or find_open_run(), oracle, name=f"oracle:{args.oracle}")
    except LogitflowError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"answered {len(answers)} questions: " + " ".join(answers))


if __name__ == "__main__":
    main()
