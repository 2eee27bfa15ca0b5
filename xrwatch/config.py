"""Frozen-dataclass configuration loaded from TOML and overridden by CLI flags.

Unknown keys are an error, and so is a value of the wrong type: a typo in a config file
must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import stat
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from xrwatch.errors import ConfigError

T = TypeVar("T")

# The tables a config file may hold: ``xrwatch serve --config`` reads [serve], ``xrwatch
# train --config`` reads [train]; one file may hold both. Anything else is a typo.
TABLES = ("serve", "train")
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB; a larger one is not a config


def nearest(name: str, known: Iterable[str]) -> str | None:
    """The valid name closest to ``name`` (difflib), or None when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_keys_error(source: str, unknown: Iterable[str], known: Iterable[str]) -> ConfigError:
    """The error for keys a config does not have, each with the valid key nearest to it."""
    unknown, known = sorted(unknown), sorted(known)
    hints = [f"did you mean {n!r} for {k!r}?" for k in unknown if (n := nearest(k, known))]
    return ConfigError(
        f"{source}: unknown key(s) {unknown}" + (f" ({' '.join(hints)})" if hints else "")
        + f"; known keys: {', '.join(known)}"
    )  # fmt: skip


def read_config_text(path: str | Path) -> str:
    """The text of the config file ``path``: a regular file of UTF-8 text, at most
    :data:`MAX_CONFIG_BYTES`. Anything else is a :class:`ConfigError` naming the file and
    the reason, never a hang (a FIFO with no writer, a device, an endless file) or a
    traceback (bytes that are not UTF-8)."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer would wait for one forever
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot open the config file ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
            raise ConfigError(f"{p}: config file is {kind}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{p}: config file is over {MAX_CONFIG_BYTES >> 10} KiB; a config is a short TOML text"
        )
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{p}: config file is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})"
        ) from None


def read_toml(path: str | Path, *, table: str | None = None) -> dict[str, Any]:
    """Read a TOML file (optionally one table of it) with clear errors. With ``table``, a
    top-level key or table other than :data:`TABLES` is an error (a misspelt ``[server]``
    would otherwise be ignored whole), naming the nearest valid table."""
    p = Path(path)
    try:
        data = tomllib.loads(read_config_text(p))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    if table is not None:
        for name in data:
            if name not in TABLES:
                close = nearest(name, TABLES)
                raise ConfigError(
                    f"{p}: unknown table [{name}]"
                    + (f"; did you mean [{close}]?" if close else "")
                    + f" (a config file holds {' and/or '.join(f'[{t}]' for t in TABLES)})"
                )
        sub = data.get(table, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{p}: [{table}] must be a table")
        return sub
    return data


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: invalid value for {name!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(name, v, inner, source) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {name} must be a finite number, got {value!r}")
        return number
    if hint is Path or hint == "Path":
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{source}: {name} must be a path string, got {value!r}")
        return Path(value)
    if isinstance(hint, type):
        if hint is int and isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
        if not isinstance(value, hint):
            raise ConfigError(
                f"{source}: {name} must be {hint.__name__}, got {type(value).__name__} {value!r}"
            )
    return value


def build_config(cls: type[T], values: dict[str, Any], *, source: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types raise ConfigError."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise unknown_keys_error(source, unknown, known)
    kwargs = {k: _coerce(k, v, hints[k], source) for k, v in values.items()}
    return cls(**kwargs)


def merge(file_values: dict[str, Any], cli_values: dict[str, Any]) -> dict[str, Any]:
    """CLI values override file values; a CLI value of ``None`` means 'not given'."""
    merged = dict(file_values)
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    return merged
