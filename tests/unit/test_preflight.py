"""preflight: a down MLflow or Prefect server is named, with a hint, before any work starts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from logitflow import preflight as pf
from logitflow.config import load_params
from logitflow.errors import LogitflowError, ServiceUnreachableError
from tests.helpers.net import free_port


@contextmanager
def http_server(status_by_path: dict[str, int]) -> Iterator[str]:
    """A server on 127.0.0.1 answering each path with its status (404 for others); yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status_by_path.get(self.path, 404))
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_address() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def test_a_closed_mlflow_port_names_the_address_its_source_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    address = closed_address()
    started = time.monotonic()
    with pytest.raises(ServiceUnreachableError) as caught:
        pf.check_mlflow(address)
    assert time.monotonic() - started < 2.5
    message = str(caught.value)
    assert address in message and "tracking.uri in params" in message
    assert "docker compose -f infra/compose.yaml up -d" in message and "make ui" in message
    assert "unset MLFLOW_TRACKING_URI" in message
    assert isinstance(caught.value, LogitflowError)  # the CLI prints it as one line


def test_a_closed_prefect_port_names_the_address_and_the_fix() -> None:
    address = closed_address() + "/api"
    with pytest.raises(ServiceUnreachableError) as caught:
        pf.check_prefect(address)
    message = str(caught.value)
    assert address in message and "PREFECT_API_URL" in message
    assert "docker compose -f infra/compose.yaml up -d" in message and "unset PREFECT_API_URL" in message


def test_healthy_servers_pass() -> None:
    with http_server({"/health": 200, "/api/health": 200}) as base:
        pf.check_mlflow(base)
        pf.check_mlflow(base + "/")
        pf.check_prefect(base + "/api")


def test_an_address_without_the_api_path_gets_that_hint() -> None:
    with http_server({"/api/health": 200}) as base, pytest.raises(ServiceUnreachableError, match=r"ends in /api"):
        pf.check_prefect(base)


def test_a_failing_server_is_reported_with_its_status() -> None:
    with http_server({"/health": 503, "/api/health": 500}) as base:
        with pytest.raises(ServiceUnreachableError, match="HTTP 503"):
            pf.check_mlflow(base)
        with pytest.raises(ServiceUnreachableError, match="HTTP 500"):
            pf.check_prefect(base + "/api")


def test_a_server_that_needs_credentials_is_up() -> None:
    with http_server({"/health": 401, "/api/health": 403}) as base:
        pf.check_mlflow(base)
        pf.check_prefect(base + "/api")


def test_a_silent_server_times_out_quickly() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ServiceUnreachableError, match=r"no answer within 0.5 s|timed out"):
            pf.check_mlflow(address, timeout=0.5)
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("uri", [None, "", "sqlite:///tmp/mlflow.db", "file:///tmp/mlruns", "postgresql://db/x"])
def test_local_stores_are_not_probed(uri: str | None) -> None:
    pf.check_mlflow(uri)
    pf.check_prefect(uri)


def test_preflight_uses_the_tracking_uri_runs_will_log_to(tiny_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from logitflow.tracking import resolve_target

    params = load_params(tiny_project / "params.yaml")
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"uri": closed_address()})})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert pf.mlflow_uri(params) == resolve_target(params, tiny_project).tracking_uri
    env_address = closed_address()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_address)
    assert pf.mlflow_uri(params) == resolve_target(params, tiny_project).tracking_uri == env_address
    expected = rf"{env_address} \(from MLFLOW_TRACKING_URI\)"
    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(ServiceUnreachableError, match=expected):
        pf.preflight(params)


def test_preflight_checks_the_prefect_api_from_prefect_settings(
    tiny_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(tiny_project / "params.yaml")  # embedded MLflow store: nothing to probe
    address = closed_address() + "/api"
    with temporary_settings(updates={PREFECT_API_URL: address}):
        assert pf.prefect_api_url() == address
        with pytest.raises(ServiceUnreachableError, match="PREFECT_API_URL"):
            pf.preflight(params)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        pf.preflight(params)  # no server configured: a flow starts its own temporary one
