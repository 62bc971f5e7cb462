"""One config style for every stage: pydantic models loaded from YAML with dotted CLI overrides.

Training, captioning, serving and eval configs all derive from :class:`Config`: unknown fields are
errors that name the field (and the file), values are validated on construction, overrides are
``key.sub=value`` strings parsed as YAML scalars, and a config saves itself as YAML next to what it
produced::

    cfg = TrainConfig.from_yaml("configs/train/tiny-cpu.yaml", overrides=["optim.lr=3e-3"])
    cfg.save("runs/x/train_config.yaml")

Relative paths are resolved once, on the driver, against the directory the user launched from
(:func:`resolve_path`), before anything is handed to Ray: Ray moves its workers into its session
folder, where a relative path means something else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the field."""


def _format_validation_error(exc: ValidationError, source: str | None) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{field}: {msg}" + (f" (got {err['input']!r})" if "input" in err and err.get("type") != "extra_forbidden" and not isinstance(err["input"], dict) else ""))
    where = f"{source}: " if source else ""
    return where + "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-3"`` -> (["optim", "lr"], 0.003); values are YAML scalars (``null`` -> None)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """A copy of ``data`` with each dotted override set (sections are created as needed)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides or ():
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_yaml_mapping(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file (local path or URI), unvalidated; errors name the file.
    For CLIs whose flags fill in fields the file leaves out."""
    from phantom_ray import storage

    path = str(path)
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


class Config(BaseModel):
    """Base of every phantom_ray config: strict fields, YAML in and out, dotted overrides."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def from_dict(cls: type[C], data: dict | None, overrides: Iterable[str] = (), source: str | None = None) -> C:
        data = apply_overrides(dict(data or {}), overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, source)) from None

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike, overrides: Iterable[str] = ()) -> C:
        return cls.from_dict(load_yaml_mapping(path), overrides, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str) -> None:
        from phantom_ray import storage

        storage.write_text_atomic(path, self.to_yaml())

    def with_overrides(self: C, overrides: Iterable[str]) -> C:
        return type(self).from_dict(self.to_dict(), overrides)


def resolve_path(value: str | os.PathLike | None, base: str | os.PathLike | None = None) -> str | None:
    """An absolute form of a local path or URI. ``s3://...`` and other URIs pass through unchanged;
    a relative local path is made absolute against ``base`` (default: the current directory, i.e.
    where the user launched the command). None stays None."""
    if value is None:
        return None
    value = str(value)
    if "://" in value:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    return os.path.normpath(str(p))


def add_deprecated_alias(parser, old: str, new: str, **kw) -> None:
    """Keep ``old`` (e.g. ``--max-new-tokens``) working as an alias of the flag ``new`` (e.g.
    ``--max-tokens``, vLLM's and OpenAI's name), with a warning naming the new spelling, so scripts
    written against the old name still run. Hidden from ``--help``."""
    import argparse
    import sys
    import warnings

    dest = new.lstrip("-").replace("-", "_")

    class _Alias(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            msg = f"{option_string} is deprecated; use {new}"
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            print(f"warning: {msg}", file=sys.stderr)
            setattr(namespace, dest, values)

    parser.add_argument(old, action=_Alias, dest=f"_deprecated_{dest}", help=argparse.SUPPRESS, **kw)
