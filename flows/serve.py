"""Serve every flow as a deployment of this project (the `pipeline` and `feedback` forms default to
params.yaml):

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve      (what `make ui` runs)

then trigger from the UI or `prefect deployment run 'pipeline/logitflow'`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.feedback import feedback
from flows.pipeline import FLOWS, pipeline
from logitflow.config import load_params

DEPLOYMENT = "logitflow"


def deployments(project: Path) -> list[RunnerDeployment]:
    defaults = load_params(project / "params.yaml").model_dump(mode="json")
    built = []
    for flow in (*FLOWS, feedback):
        parameters = {"project": str(project)}
        if flow in (pipeline, feedback):
            parameters["params"] = defaults
        built.append(flow.to_deployment(name=DEPLOYMENT, parameters=parameters, tags=["logitflow"]))
    return built


if __name__ == "__main__":
    serve(*deployments(Path.cwd()))
