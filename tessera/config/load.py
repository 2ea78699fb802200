"""Fill a :class:`JobConfig` from a TOML file and command-line overrides.

Errors are :class:`ConfigError` with one line that names the field (or the flag
that set it), what was given and what is allowed, so that the CLI can print it
without a traceback.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping

import msgspec

from tessera.config.flags import FLAG_FIELDS
from tessera.config.schema import JobConfig


class ConfigError(ValueError):
    """A job file or flag the user must fix; the message is one line."""


def _type_at(path: list[str]) -> Any:
    t: Any = JobConfig
    for part in path:
        try:
            hints = typing.get_type_hints(t)
        except TypeError:
            return None
        if part not in hints:
            return None
        t = hints[part]
    return t


def _allowed_fields(path: list[str]) -> list[str] | None:
    t = _type_at(path)
    if isinstance(t, type) and issubclass(t, msgspec.Struct):
        return list(t.__struct_fields__)
    return None


def _explain(exc: msgspec.ValidationError, flags: Mapping[str, str]) -> str:
    text = str(exc)
    m = re.match(r"^(.*?)(?: - at `\$(.*)`)?$", text, re.S)
    message, where = (m.group(1), m.group(2) or "") if m else (text, "")
    path = [p for p in re.split(r"\.|\[", where) if p and not p.endswith("]")]
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        field = ".".join(path + [unknown.group(1)])
        allowed = _allowed_fields(path)
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        return f"{field}: unknown field{hint}"
    # __post_init__ messages start with the field they are about: "workers must be ...".
    subject = re.match(r"^(\w+) (?:must|needs)", message)
    if subject and _type_at(path + [subject.group(1)]) is not None:
        path = path + [subject.group(1)]
    field = ".".join(path) or "job"
    if message.startswith("Invalid enum value"):
        choices = typing.get_args(_type_at(path))
        if choices:
            message += f"; allowed: {', '.join(repr(c) for c in choices)}"
    # Name the flag when a flag set this field: that is what the user typed.
    for flag, dotted in flags.items():
        if dotted == field:
            field = f"{flag} ({dotted})"
    message = message.replace("Expected", "expected").replace("`", "")
    return f"{field}: {message}"


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, bool):  # `profile = true` is short for `[profile] enabled = true`
            child = node[part] = {"enabled": child}
        if not isinstance(child, dict):
            raise ConfigError(f"{part}: expected a table, got {type(child).__name__}")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Read ``path`` (TOML; optional), apply ``overrides`` (flag -> value), validate.

    ``overrides`` keys are flags from :data:`FLAG_FIELDS` or dotted field paths.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"job file {str(p)!r} does not exist; pass the path of a TOML job file "
                              f"such as examples/digits.toml")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"job file {str(p)!r} is not valid TOML: {exc}") from None
        raw.setdefault("name", p.stem)
    flags: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        dotted = FLAG_FIELDS.get(key, key)
        flags[key] = dotted
        _set_path(raw, dotted, value)
    try:
        return msgspec.convert(raw, JobConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, flags)) from None


def config_to_dict(cfg: JobConfig) -> dict:
    """The resolved configuration as plain JSON-able builtins."""
    return msgspec.to_builtins(cfg)


def config_from_dict(raw: Mapping[str, Any]) -> JobConfig:
    """Inverse of :func:`config_to_dict` (used by role processes)."""
    try:
        return msgspec.convert(dict(raw), JobConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, {})) from None
