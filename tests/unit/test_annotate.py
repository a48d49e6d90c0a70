"""The scripted annotator's own logic: the answer-key oracle and its input checks."""

from __future__ import annotations

import pytest

from flows.annotate import answer_key_oracle, parse_run_id
from logitflow.errors import LogitflowError


def _question(a: str, b: str, pair: str = "p1") -> dict:
    return {"pair_id": pair, "response_a": a, "response_b": b}


def test_the_answer_key_prefers_the_response_that_states_the_answer() -> None:
    oracle = answer_key_oracle({"p1": "42"})
    assert oracle(_question("The answer is 42.", "It is 420.")) == "a"
    assert oracle(_question("It is 41.", "42, of course")) == "b"
    assert oracle(_question("42", "42 again")) == "skip", "both right: cannot tell"
    assert oracle(_question("41", "43")) == "skip", "both wrong: cannot tell"
    with pytest.raises(LogitflowError, match="pair 'p9' is not in the answer key"):
        oracle(_question("42", "41", pair="p9"))


def test_a_flow_run_id_that_is_not_a_uuid_is_named() -> None:
    assert str(parse_run_id("0b9c6e3c-8f6e-4b7a-9d5e-3f1c2a4b5c6d")) == "0b9c6e3c-8f6e-4b7a-9d5e-3f1c2a4b5c6d"
    with pytest.raises(LogitflowError, match="'run-17' is not a flow run id"):
        parse_run_id("run-17")
