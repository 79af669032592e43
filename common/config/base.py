"""What every config shares: strict models (an unknown key is an error), loading YAML with errors
that name the file, the field and what was expected, and commented YAML for `init` commands."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from common import errors

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message says where and why."""

    exit_code = errors.CONFIG


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key")
        else:
            got = e.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {field}: {e['msg']}{got_text}")
    return "\n".join(lines)


def _load(path: Path, model: type[_M]) -> _M:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def commented_yaml(model: BaseModel, *, title: str) -> str:
    """YAML of `model` with each field's description as a comment above it (for `init` commands)."""
    lines = [f"# {title}", "# Every key is optional; the values below are the defaults unless set by init."]

    def emit(m: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in type(m).model_fields.items():
            value = getattr(m, name)
            if field.description:
                lines.append(f"{pad}# {field.description}")
            if isinstance(value, BaseModel):
                doc = (type(value).__doc__ or "").strip().splitlines()
                if doc and not field.description:
                    lines.append(f"{pad}# {doc[0]}")
                lines.append(f"{pad}{name}:")
                emit(value, indent + 1)
            else:
                dumped = yaml.safe_dump(
                    {name: value if not isinstance(value, Path) else str(value)}, default_flow_style=True, width=10_000
                )
                lines.append(f"{pad}{dumped.strip()[1:-1]}")

    emit(model, 0)
    return "\n".join(lines) + "\n"


def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` on top, nested dicts merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_class_names(names: list[str] | None, n_classes: int | None, where: str) -> None:
    if names is not None and len(names) != n_classes:
        raise ValueError(f"{where}.class_names has {len(names)} names but {where}.n_classes is {n_classes}")
