from __future__ import annotations

import json
import logging

import pytest

from xrwatch import errors
from xrwatch.logs import JsonFormatter, OneLineFormatter


def test_error_tree_matches_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, errors.XRWatchError):
            assert name in doc, f"{name} missing from the tree drawn in errors.py's docstring"
    assert issubclass(errors.TruncatedImageError, errors.ImageDecodeError)
    assert issubclass(errors.NotARadiographError, errors.UnsupportedImageError)
    assert issubclass(errors.ModelMetadataError, errors.ModelError)


def test_image_error_names_the_file() -> None:
    exc = errors.ImageDecodeError("/in/a.dcm", "pixel data does not decode")
    assert exc.path == "/in/a.dcm" and exc.reason == "pixel data does not decode"
    assert str(exc) == "/in/a.dcm: pixel data does not decode"


def test_require_extra_names_the_extra() -> None:
    errors.require_extra("train", "json")  # present: no error
    with pytest.raises(errors.MissingExtraError) as info:
        errors.require_extra("train", "xrwatch_no_such_module")
    assert "pip install 'xrwatch[train]'" in str(info.value)
    assert "xrwatch_no_such_module" in str(info.value)


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "xrwatch.t", "levelname": "INFO", "msg": msg})
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_formatter_one_object_per_line_with_extras() -> None:
    line = JsonFormatter().format(_record("processed\nfile", file="a.png", ms=12.5))
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "processed\nfile"
    assert data["file"] == "a.png" and data["ms"] == 12.5
    assert data["level"] == "info" and data["time"].endswith("Z")


def test_text_formatter_keeps_one_line() -> None:
    assert "\n" not in OneLineFormatter("%(message)s").format(_record("a\nb"))
