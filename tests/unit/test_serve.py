"""The deployments `make ui` serves: one per flow, the pipeline and feedback forms defaulting to params.yaml."""

from __future__ import annotations

from pathlib import Path

from flows.serve import deployments
from logitflow.config import load_params


def test_every_flow_is_a_deployment_and_the_pipeline_defaults_to_params_yaml(tiny_project: Path) -> None:
    built = {d.flow_name: d for d in deployments(tiny_project)}
    assert set(built) == {"pipeline", "cache-teacher", "select", "train-dpo", "distill", "feedback"}
    for name in ("pipeline", "feedback"):
        deployment = built[name]
        assert deployment.parameters["params"] == load_params(tiny_project / "params.yaml").model_dump(mode="json")
        assert deployment.parameters["project"] == str(tiny_project)
        assert "params" in deployment._parameter_openapi_schema.properties
    assert {"budget", "hand_off"} <= set(built["feedback"]._parameter_openapi_schema.properties)
