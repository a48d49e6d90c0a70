"""User-facing errors: the CLI prints these as one line, without a traceback."""


class LogitflowError(Exception):
    """A problem the user can fix: bad params, bad data, a mismatched cache, a missing file."""


class ParamsError(LogitflowError):
    """params.yaml (or an overlay) is malformed or holds a bad value."""


class DataError(LogitflowError):
    """A data file or one of its rows is unusable."""


class ModelError(LogitflowError):
    """A model or tokenizer cannot be found or loaded as specified."""


class RayUnavailableError(ParamsError):
    """compute.ray names a Ray cluster that cannot be reached or used (or Ray is not installed)."""


class ServiceUnreachableError(LogitflowError):
    """A server the run needs (MLflow tracking, the Prefect API) does not answer at its address."""
