"""The `feedback` flow: online ADPO with a person in the loop.

`dvc repro pool` (the unlabelled pair pool), a reference-policy pass over it (score_prefs'
sharded, cached pass), then one question at a time: the ActiveSelector proposes the pair whose label
adds the most to the log det of the design, the flow pauses with a form (the prompt, both responses,
why this pair) and waits for a, b or skip. Each answer is on disk (fsynced) before the next question;
θ̂ is refit after 1, 2, 4, 8, ... labels. The session ends at the label budget, when the person ticks
`stop`, when the pool runs out, or when no answer comes within `feedback.question_timeout_s`. A rerun
continues from the labels on disk and never asks about a pair twice.

The collected set is exported as a preference dataset (`<paths.feedback>/<session>/dataset/`) that
DVC tracks (`dvc add`); `hand_off=True` then trains DPO on it as a DVC experiment.

Labels can come from the UI or from a script: `python -m flows.annotate <flow-run-id>` answers
through Prefect's API (`resume_flow_run(flow_run_id, run_input=...)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput, create_flow_run_input
from prefect.runtime import flow_run
from pydantic import Field

from flows.dvc import BIN, run_logged
from flows.pipeline import changed_params, run_experiment
from logitflow import tracking
from logitflow.cache.ref_scores import PairScores
from logitflow.config import Params, load_params
from logitflow.data.load import split_indices
from logitflow.data.pool import Pool, read_pool
from logitflow.errors import LogitflowError, ParamsError
from logitflow.feedback.labels import LabelRecord
from logitflow.feedback.pool_scores import score_pool
from logitflow.feedback.session import FeedbackSession, Question, open_session
from logitflow.preflight import check_mlflow, mlflow_uri, preflight


class Label(RunInput):
    """The form a person answers for each question."""

    answer: Literal["a", "b", "skip"] = Field(
        description="a: response A is better; b: response B is better; skip: cannot tell (the pair is not asked again)"
    )
    stop: bool = Field(default=False, description="end the session after this answer (every answer is kept)")
    annotator: str = Field(default="", max_length=100, description="your name or id, stored with the label")


def question_key(number: int) -> str:
    """The pause key of question `number`; the question itself is a flow-run input under the same key."""
    return f"question-{number}"


def describe(question: Question, budget: int) -> str:
    """The form's Markdown: the prompt, both responses, and why this pair was chosen."""
    prompt = "\n\n".join(f"**{m['role']}**: {m['content']}" for m in question.prompt)
    fence = "~~~~~~"
    return (
        f"### Question {question.number} · label {question.labels + 1} of {budget}\n\n"
        f"{prompt}\n\n"
        f"#### Response A\n{fence}\n{question.response_a}\n{fence}\n\n"
        f"#### Response B\n{fence}\n{question.response_b}\n{fence}\n\n"
        f"Asked because its label would raise the log det of the design by **{question.gain:.4f}** "
        f"(now {question.logdet:.2f}), the most of the {question.remaining} pairs not asked yet. "
        f"Pair `{question.pair_id}`. Every answer is saved before the next question."
    )


def _artifact_key(session: str, what: str) -> str:
    return f"feedback-{session.replace('_', '-')}-{what}"


@task(task_run_name="score pool", retries=2, retry_delay_seconds=5)
def score_pool_task(params: Params, project: str) -> tuple[Pool, PairScores]:
    root = Path(project)
    pool = read_pool(root / params.paths.pool)
    return pool, score_pool(params, root, pool)


@task(task_run_name="pool")
def build_pool(project: str) -> None:
    run_logged([str(BIN / "dvc"), "repro", "pool"], Path(project))


@task(task_run_name="export")
def export(session: FeedbackSession, project: str) -> Path:
    """The collected set as a preference dataset, tracked by DVC."""
    preferences = session.export()
    dataset = preferences.parent
    if (Path(project) / ".dvc").is_dir():
        run_logged([str(BIN / "dvc"), "add", str(dataset.relative_to(project))], Path(project))
    return preferences


def _record_metrics(record: LabelRecord, session: FeedbackSession) -> dict[str, float]:
    answered = session.records[: record.question]
    return {
        "labels": record.labels,
        "gain": record.gain,
        "logdet": record.logdet,
        "skipped": sum(r.answer == "skip" for r in answered),
        "refit": float(record.refit),
        "remaining": len(session.pool) - len(answered),
    }


def backfill_metrics(session: FeedbackSession, run_id: str) -> None:
    """Step metrics of answers stored on disk but not in MLflow (a run killed between the two)."""
    logged = {metric.step for metric in tracking.metric_history(run_id, "gain")}
    for record in session.records:
        if record.question not in logged:
            tracking.log_metrics(_record_metrics(record, session), step=record.question)


def _progress_table(session: FeedbackSession) -> list[dict[str, Any]]:
    return [
        {
            "question": r.question,
            "pair": r.pair_id,
            "answer": r.answer,
            "gain": round(r.gain, 4),
            "logdet": round(r.logdet, 3),
            "labels": r.labels,
            "theta_refit": "yes" if r.refit else "",
            "annotator": r.annotator,
        }
        for r in session.records
    ]


class NoAnswer(LogitflowError):
    """A question waited longer than feedback.question_timeout_s."""


def ask(session: FeedbackSession, params: Params, budget: int) -> tuple[str, bool]:
    """Ask until the budget is reached or the session ends; returns why it stopped and whether
    that was a question left unanswered."""
    logger = get_run_logger()
    section = params.feedback
    progress = create_progress_artifact(
        progress=100 * session.labels / budget,
        key=_artifact_key(section.session, "progress"),
        description=f"labels collected in session '{section.session}' (budget {budget})",
    )
    while session.labels < budget:
        question = session.next_question()
        if question is None:
            return "every pair in the pool has been asked", False
        key = question_key(question.number)
        create_flow_run_input(key=key, value=question.as_dict())
        logger.info(
            "question %d: pair %s, gain %.4f (log det %.2f, %d labels, %d pairs left)",
            question.number,
            question.pair_id,
            question.gain,
            question.logdet,
            question.labels,
            question.remaining,
        )
        try:
            label = pause_flow_run(
                wait_for_input=Label.with_initial_data(description=describe(question, budget)),
                timeout=section.question_timeout_s,
                poll_interval=section.poll_interval_s,
                key=key,
            )
        except FlowPauseTimeout:
            return f"no answer to question {question.number} within {section.question_timeout_s} s", True
        record = session.answer(question, label.answer, annotator=label.annotator, flow_run_id=str(flow_run.id))
        tracking.log_metrics(_record_metrics(record, session), step=record.question)
        update_progress_artifact(artifact_id=progress, progress=100 * session.labels / budget)
        create_table_artifact(
            table=_progress_table(session),
            key=_artifact_key(section.session, "answers"),
            description=f"every answer of session '{section.session}': the gain each pair was chosen for",
        )
        logger.info("answer %s to question %d%s", label.answer, record.question, " (θ̂ refit)" if record.refit else "")
        if label.stop:
            return f"stopped by {label.annotator or 'the annotator'}", False
    return f"label budget of {budget} reached", False


# What the pool and its scores are made from: `dvc repro pool` reads these from params.yaml.
POOL_KEYS = ("feedback.pool", "feedback.demo", "feedback.on_bad_rows", "models", "paths")


def check_form(defaults: Params, params: Params, budget: int | None) -> None:
    """The form may change the session, budget, timeouts and the design's settings, but not what the
    pool is built from: that comes from params.yaml through DVC."""
    if budget is not None and budget < 1:
        raise ParamsError(f"feedback: budget = {budget} (the flow's parameter): it must be at least 1 label")
    changed = changed_params(defaults.model_dump(mode="json"), params.model_dump(mode="json"))
    pool_keys = [key for key in changed if key.startswith(POOL_KEYS)]
    if pool_keys:
        raise ParamsError(
            f"feedback: {', '.join(f'{key} = {changed[key]!r}' for key in pool_keys)} differ from params.yaml, "
            "but the pool is built by `dvc repro pool` from params.yaml: change them there (and commit)"
        )


@flow(name="feedback", log_prints=True)
def feedback(
    params: Params | None = None, project: str = ".", budget: int | None = None, hand_off: bool = False
) -> dict[str, Any]:
    """Ask a person about the most informative pairs, one at a time; `budget` overrides
    feedback.budget; `hand_off` trains DPO on the collected set afterwards (a DVC experiment)."""
    root = Path(project).resolve()
    defaults = load_params(root / "params.yaml")
    params = params or defaults
    check_form(defaults, params, budget)
    budget = budget or params.feedback.budget
    check_mlflow(mlflow_uri(params))
    logger = get_run_logger()
    build_pool(str(root))
    pool, scores = score_pool_task(params, str(root))
    session = open_session(params, root, pool, scores)
    if session.records:
        logger.info("session '%s': %d answers on disk, continuing", params.feedback.session, len(session.records))
    with tracking.start_run(
        params,
        root,
        stage="feedback",
        run_name=f"feedback@{params.feedback.session}",
        resume_run_id=session.info.mlflow_run_id,
        tags={"prefect.flow_run_id": str(flow_run.id)},
    ) as run:
        assert run is not None
        session.remember_run(run.info.run_id)
        backfill_metrics(session, run.info.run_id)
        stopped, unanswered = ask(session, params, budget)
        preferences = export(session, str(root))
        summary = {
            "session": params.feedback.session,
            "stopped": stopped,
            "questions": len(session.records),
            "labels": session.labels,
            "skipped": len(session.records) - session.labels,
            "logdet": round(session.logdet, 4),
            "theta_refits": list(session.selector.refits),
            "preferences": str(preferences.relative_to(root)),
        }
        tracking.log_dict(summary, "feedback_summary.json")
    logger.info("session '%s' ended (%s): %s", params.feedback.session, stopped, json.dumps(summary))
    if unanswered:  # Prefect fails a run whose pause timed out; say why, and that nothing was lost
        raise NoAnswer(f"{stopped}: {session.labels} labels kept in {session.store.path}; run the flow again to go on")
    if hand_off:
        summary["experiment"] = hand_off_to_dpo(params, root, summary)
    return summary


def hand_off_to_dpo(params: Params, root: Path, summary: dict[str, Any]) -> str:
    """DPO on every collected label (they were already chosen actively: `uniform` at the full
    budget keeps them all), as a DVC experiment; params.yaml is not changed."""
    train, _ = split_indices(summary["labels"], params.prepare.heldout_fraction, params.prepare.seed)
    overrides = {
        "prepare.preferences.type": "local",
        "prepare.preferences.path": summary["preferences"],
        "prepare.preference_format": "plain",
        "select.primary": "uniform",
        "select.budget": len(train),
        "train_dpo.methods": ["uniform"],
    }
    name = f"feedback-{params.feedback.session}-{flow_run.name}"
    dataset = str(Path(summary["preferences"]).parent)
    return run_experiment(name, overrides, str(root), {}, targets=["train_dpo"], copy_paths=[dataset])


def main() -> None:
    """`python -m flows.feedback [--budget N]`: the feedback flow from a shell (a temporary Prefect
    server starts when no PREFECT_API_URL is set; answer in its UI or with `python -m flows.annotate`)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--project", default=".")
    args = parser.parse_args()
    preflight(load_params(Path(args.project) / "params.yaml"))
    feedback(project=args.project, budget=args.budget)


if __name__ == "__main__":
    main()
