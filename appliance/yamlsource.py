"""Load YAML into plain data while remembering where each key was written.

pydantic reports an error location as a path of keys (`mqtt.port`); `validate_yaml` turns that
path back into `FILE:LINE`, so an engineer fixing a config on a cart sees where to look.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from appliance.errors import ConfigError, UserError

ModelT = TypeVar("ModelT", bound=BaseModel)
Location = tuple[int | str, ...]


def _index_lines(node: yaml.Node, path: Location, lines: dict[Location, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*path, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*path, index), lines)


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[Location, int]]:
    """Return (data, {key path: line number}) for a YAML file; raise ConfigError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8"
        ) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    lines: dict[Location, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    return data if data is not None else {}, lines


def written_path(loc: Location, lines: Mapping[Location, int]) -> Location:
    """The key path as written in the YAML for a validation location.

    A discriminated union adds its tag to the location (`inference.backend.tensorrt.workspace_mb`
    for `backend: {type: tensorrt, workspace_mb: ...}`), and an upgraded old form moves a section
    (`inference.tensorrt` into `inference.backend`): dropping one or two inner parts finds the key
    the user wrote. Without such a match the location itself is returned.
    """
    if loc in lines or len(loc) < 3:
        return loc
    inner = range(1, len(loc) - 1)
    for dropped in (*itertools.combinations(inner, 1), *itertools.combinations(inner, 2)):
        candidate = tuple(part for i, part in enumerate(loc) if i not in dropped)
        if candidate in lines:
            return candidate
    return loc


def nearest_line(loc: Location, lines: Mapping[Location, int]) -> int | None:
    # An unknown or missing key has no line of its own: fall back to its parent's.
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def where(source: Path | None, loc: Location, lines: Mapping[Location, int]) -> str:
    """`FILE:LINE` of a key path (as much of it as is known)."""
    line = nearest_line(loc, lines)
    return f"{source}:{line}" if source and line else str(source or "config")


def format_validation_error(exc: ValidationError, source: Path, lines: dict[Location, int]) -> str:
    messages = []
    for error in exc.errors():
        loc: Location = written_path(tuple(error["loc"]), lines)
        key = ".".join(str(part) for part in loc) or "(top level)"
        line = nearest_line(loc, lines)
        where = f"{source}:{line}" if line else str(source)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling; see the JSON Schema)"
        elif error["type"] == "missing":
            message = "required key is missing"
        messages.append(f"{where}: {key}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(messages)


def validate_yaml(model: type[ModelT], path: Path, error_class: type[UserError] = ConfigError) -> ModelT:
    """Load `path` and validate it as `model`; errors name the key and the YAML line."""
    data, lines = load_yaml_with_lines(path)
    try:
        # lines/source let a validator that reads an older config shape name where it was written.
        context = {"source_dir": path.parent, "source": path, "lines": lines}
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise error_class(format_validation_error(exc, path, lines)) from None
