"""The deployments `make ui` serves: one per flow, the pipeline's form defaulting to params.yaml."""

from __future__ import annotations

from pathlib import Path

from flows.serve import deployments
from logitflow.config import load_params


def test_every_flow_is_a_deployment_and_the_pipeline_defaults_to_params_yaml(tiny_project: Path) -> None:
    built = {d.flow_name: d for d in deployments(tiny_project)}
    assert set(built) == {"pipeline", "cache-teacher", "select", "train-dpo", "distill"}
    pipeline = built["pipeline"]
    assert pipeline.parameters["params"] == load_params(tiny_project / "params.yaml").model_dump(mode="json")
    assert pipeline.parameters["project"] == str(tiny_project)
    assert "params" in pipeline._parameter_openapi_schema.properties
