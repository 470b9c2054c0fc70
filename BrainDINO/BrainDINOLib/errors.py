"""The one exception type for problems a user can fix (bad file, bad option, bad bundle), and checked reading of
the JSON objects users' files hold."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path

T = typing.TypeVar("T")


class BrainDINOError(ValueError):
    """Raised with a one-line message that names the file or option and the problem.

    The command line prints the message alone (no traceback) and exits non-zero.
    """


def describe(error: BaseException) -> str:
    """First sentence of a library's exception message, at most 160 characters (its type name when empty)."""
    lines = str(error).strip().splitlines()
    if not lines or not lines[0]:
        return type(error).__name__
    first = re.split(r"(?<=[.!?]) (?=[A-Z])", lines[0], maxsplit=1)[0]
    return first if len(first) <= 160 else first[:159] + "\u2026"


def read_text(path: str | Path) -> str:
    """A user's text file (UTF-8, with or without a byte-order mark), or one line saying where it is not text.

    Raises:
        BrainDINOError: unreadable, or not UTF-8 (naming the line and the byte).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise BrainDINOError(f"{path}: cannot read it ({describe(error)})") from error
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise BrainDINOError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{raw[error.start]:02x}); save the file as UTF-8"
        ) from error


def read_json(path: str | Path) -> object:
    """A user's JSON file, or one line naming the file and where it is broken.

    Raises:
        BrainDINOError: unreadable, not UTF-8, or not valid JSON (with the line and column).
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BrainDINOError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from error


def from_fields(cls: type[T], values: object, what: str) -> T:
    """A dataclass built from a JSON object whose every field (nested dataclasses too) is checked against the
    class's annotations (lists become tuples), so a damaged file is refused here, naming the field, rather than
    failing later in arithmetic.

    Raises:
        BrainDINOError: ``what: field 'a.b' must be ..., not ...`` (or an unknown or missing field).
    """
    try:
        return _build(cls, values, "")
    except _FieldError as error:
        raise BrainDINOError(f"{what}: {error}") from None


class _FieldError(Exception):
    def __init__(self, path: str, problem: str):
        super().__init__(f"field '{path}' {problem}" if path else problem)


def _build(cls, values, path: str):
    if not isinstance(values, dict):
        raise _FieldError(path, f"must be an object, not {_json_type(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    within = f"{path}." if path else ""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise _FieldError("", f"unknown field '{within}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    required = [n for n, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise _FieldError("", f"the field '{within}{missing[0]}' is missing")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _checked(value, hints[name], within + name) for name, value in values.items()})


def _checked(value, annotation, path: str):
    """``value`` as ``annotation`` says (a list as a tuple), or the error naming the field at ``path``."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in arguments:
            try:
                return _checked(value, option, path)
            except _FieldError:
                continue
        raise _FieldError(path, f"must be {' or '.join(map(_expected, arguments))}, not {_json_type(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _FieldError(path, f"must be a list, not {_json_type(value)}")
        kinds = arguments[:1] * len(value) if len(arguments) == 2 and arguments[1] is Ellipsis else arguments
        if len(value) != len(kinds):
            raise _FieldError(path, f"must be a list of {len(kinds)} values, not {len(value)}")
        pairs = enumerate(zip(value, kinds, strict=True))
        return tuple(_checked(item, kind, f"{path}[{i}]") for i, (item, kind) in pairs)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _FieldError(path, f"must be an object, not {_json_type(value)}")
        if arguments:
            return {k: _checked(v, arguments[1], f"{path}.{k}") for k, v in value.items()}
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    valid = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str),
        type(None): value is None,
    }
    if annotation not in valid:
        raise TypeError(f"no check for the annotation {annotation}")  # a programming error, not the file's
    if not valid[annotation]:
        raise _FieldError(path, f"must be {_expected(annotation)}, not {_json_type(value)}")
    return float(value) if annotation is float else value


def _expected(annotation) -> str:
    names = {int: "a whole number", float: "a finite number", str: "text", bool: "true or false", type(None): "null"}
    return names.get(annotation, "a list" if typing.get_origin(annotation) is tuple else "an object")


def _json_type(value) -> str:
    """How a JSON value reads in a message."""
    if isinstance(value, bool) or value is None:
        return "null" if value is None else str(value).lower()
    if isinstance(value, int | float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return f"'{value[:30]}'"
    return "a list" if isinstance(value, list | tuple) else "an object" if isinstance(value, dict) else "a value"
