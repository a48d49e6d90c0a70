"""Editing params.yaml in place (comments and order kept) for `logitflow params apply`."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from logitflow.config import deep_merge, read_yaml_mapping, validate_params
from logitflow.errors import ParamsError
from logitflow.fsio import atomic_write_text


def _merge_into(document: Any, overlay: Mapping[str, Any], prefix: str, changed: list[str]) -> None:
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(document.get(key), Mapping):
            _merge_into(document[key], value, f"{prefix}{key}.", changed)
        elif document.get(key) != value:
            document[key] = value
            changed.append(f"{prefix}{key}")


def apply_overlay(params_file: Path, overlay_file: Path) -> list[str]:
    """Validate params + overlay, then rewrite params_file with the overlay's values merged in.
    Returns the dotted keys that changed."""
    overlay = read_yaml_mapping(overlay_file)
    validate_params(deep_merge(read_yaml_mapping(params_file), overlay), f"{params_file} + {overlay_file}")
    yaml = YAML()
    yaml.preserve_quotes = True
    try:
        document = yaml.load(params_file.read_text(encoding="utf-8"))
    except Exception as err:  # ruamel raises its own hierarchy
        raise ParamsError(f"{params_file}: cannot parse for editing: {err}") from None
    changed: list[str] = []
    _merge_into(document, overlay, "", changed)
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    atomic_write_text(params_file, buffer.getvalue())
    return changed
