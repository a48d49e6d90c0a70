"""Fail fast when a server the run needs is down: before any stage starts, not an hour later.

`preflight(params)` checks the MLflow tracking server (MLFLOW_TRACKING_URI, else `tracking.uri`: the
same precedence as `tracking.resolve_target`) and the Prefect API (PREFECT_API_URL from the environment
or the Prefect profile). Only http(s) addresses are probed; the embedded SQLite store, file and database
URIs are local, and with no PREFECT_API_URL a flow starts its own temporary server.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from logitflow.config import Params
from logitflow.errors import ServiceUnreachableError

TIMEOUT_S = 3.0
SERVERS_HINT = "start it (`make ui` for local servers, `docker compose -f infra/compose.yaml up -d` for the team's)"


def _probe(url: str, timeout: float) -> tuple[int | None, str]:
    """(HTTP status, '') when something answered, else (None, why not). Auth errors count as answers:
    the server is up, and the client's credentials are that client's business."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, ""
    except urllib.error.HTTPError as err:
        return err.code, ""
    except urllib.error.URLError as err:
        reason = err.reason
        return None, str(reason.strerror if isinstance(reason, OSError) and reason.strerror else reason)
    except TimeoutError:
        return None, f"no answer within {timeout:g} s"
    except (OSError, ValueError) as err:  # connection reset mid-request, malformed URL
        return None, str(err)


def _is_http(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def mlflow_uri(params: Params) -> str | None:
    """The tracking server runs log to (None: the embedded store), as `tracking.resolve_target` picks it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri


def check_mlflow(uri: str | None, timeout: float = TIMEOUT_S) -> None:
    """GET <uri>/health for an http(s) tracking URI; raise ServiceUnreachableError naming the address."""
    if not uri or not _is_http(uri):
        return
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "tracking.uri in params"
    health = uri.rstrip("/") + "/health"
    status, why = _probe(health, timeout)
    if status is None or status >= 500 or status == 404:
        problem = why or f"GET {health} answered HTTP {status}"
        raise ServiceUnreachableError(
            f"MLflow tracking server {uri} (from {source}) is unreachable: {problem}. "
            f"Hint: {SERVERS_HINT}, or unset MLFLOW_TRACKING_URI and tracking.uri to log to the embedded "
            "store (.mlflow/mlflow.db)."
        )


def prefect_api_url() -> str | None:
    """PREFECT_API_URL as Prefect itself resolves it (environment, then the active profile)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def check_prefect(api_url: str | None, timeout: float = TIMEOUT_S) -> None:
    """GET <PREFECT_API_URL>/health; raise ServiceUnreachableError naming the address."""
    if not api_url or not _is_http(api_url):
        return
    health = api_url.rstrip("/") + "/health"
    status, why = _probe(health, timeout)
    if status == 404:
        raise ServiceUnreachableError(
            f"Prefect API {api_url} (PREFECT_API_URL) answered 404 at {health}: no Prefect API there. "
            "Hint: the URL ends in /api, e.g. http://127.0.0.1:4200/api."
        )
    if status is None or status >= 500:
        problem = why or f"GET {health} answered HTTP {status}"
        raise ServiceUnreachableError(
            f"Prefect API {api_url} (PREFECT_API_URL) is unreachable: {problem}. "
            f"Hint: {SERVERS_HINT}, or unset PREFECT_API_URL (`prefect config unset PREFECT_API_URL` if a "
            "profile sets it) to run on a temporary local server."
        )


def preflight(params: Params, *, timeout: float = TIMEOUT_S) -> None:
    """Both checks, MLflow first; raises ServiceUnreachableError for the first server that is down."""
    check_mlflow(mlflow_uri(params), timeout)
    check_prefect(prefect_api_url(), timeout)
