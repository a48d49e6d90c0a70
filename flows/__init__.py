"""Prefect flows: orchestration only. Every stage runs through DVC (`dvc repro`), so DVC skips what
is up to date and dvc.lock stays the one record; MLflow gets one parent run per flow run."""
