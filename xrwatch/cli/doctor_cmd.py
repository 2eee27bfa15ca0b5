"""``xrwatch doctor``: what this installation can do, in one table.

Python and package versions, the CPU and its ISA features (AVX2, AVX-512, VNNI, AMX),
ONNX Runtime providers and whether a CUDA session can really be created (and why not), the
DICOM pixel-data plugins per transfer syntax, and whether torch is installed. torch is
looked up, never imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import typer

from xrwatch import __version__
from xrwatch.cli._app import EXIT_FAILED, EXIT_OK, app, console
from xrwatch.logs import configure_logging

if TYPE_CHECKING:
    from xrwatch.modelmeta import ModelMeta

logger = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail", "info"]

# (distribution, needed by serving?) - distributions, so no import happens
PACKAGES: tuple[tuple[str, bool], ...] = (
    ("numpy", True),
    ("pillow", True),
    ("pydicom", True),
    ("pylibjpeg", True),
    ("pylibjpeg-libjpeg", True),
    ("pylibjpeg-openjpeg", True),
    ("pylibjpeg-rle", False),
    ("python-gdcm", False),
    ("watchdog", True),
    ("typer", True),
    ("rich", True),
    ("isal", False),  # faster heatmap PNGs; zlib writes the same pictures without it
    ("onnx", False),
    ("torch", False),
    ("torchvision", False),
)
ORT_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime")
# Transfer syntaxes a hospital sends; the compressed ones need a plugin.
DICOM_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)


@dataclass(frozen=True)
class Check:
    section: str
    item: str
    value: str
    status: Status = "info"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- a tiny ONNX model, encoded by hand (onnx is in the `train` extra, not core) -----------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _float_tensor_info(name: str, dims: tuple[int, ...]) -> bytes:
    shape = b"".join(_bytes_field(1, _int_field(1, d)) for d in dims)  # Dimension.dim_value
    tensor = _int_field(1, 1) + _bytes_field(2, shape)  # elem_type FLOAT, shape
    return _bytes_field(1, name) + _bytes_field(2, _bytes_field(1, tensor))  # ValueInfoProto


def tiny_onnx_model() -> bytes:
    """A serialized ModelProto computing ``y = x + x`` for float32 ``x`` of shape [1, 4]."""
    node = _bytes_field(1, "x") + _bytes_field(1, "x") + _bytes_field(2, "y")
    node += _bytes_field(3, "add") + _bytes_field(4, "Add")
    graph = _bytes_field(1, node) + _bytes_field(2, "xrwatch_doctor")
    graph += _bytes_field(11, _float_tensor_info("x", (1, 4)))
    graph += _bytes_field(12, _float_tensor_info("y", (1, 4)))
    opset = _bytes_field(1, "") + _int_field(2, 13)
    return (
        _int_field(1, 7)  # ir_version 7 (ONNX 1.8+)
        + _bytes_field(2, "xrwatch-doctor")
        + _bytes_field(7, graph)
        + _bytes_field(8, opset)
    )


def _capture_fd2(func: Callable[[], object]) -> tuple[object, str]:
    """Run ``func`` while collecting what native code writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            result: object = func()
        except Exception as exc:
            result = exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", "replace")
    return result, text


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_PREFIX = re.compile(
    r"^\S+ \S+ \[[EW]:onnxruntime:[^\]]*\] "
)  # "date time [E:ort:..., file:line fn] "
_LIB_ERROR = re.compile(r"Failed to load library (\S+) with error: (.+)")


def cuda_failure_reason(log: str) -> str:
    """The one useful line of what ONNX Runtime printed when CUDA did not come up."""
    lines = [_ORT_PREFIX.sub("", _ANSI.sub("", ln)).strip() for ln in log.splitlines()]
    lines = [ln for ln in lines if ln]
    for line in lines:
        match = _LIB_ERROR.search(line)
        if match:
            library = os.path.basename(match.group(1))
            return (
                f"{library} does not load: {match.group(2).strip()} (CUDA/cuDNN libraries missing?)"
            )
    useful = [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower()] or lines
    return " | ".join(useful[-2:])[:400] or "ONNX Runtime fell back to the CPU without saying why"


def cuda_session_check() -> Check:
    """Try to create (and run) a CUDA session; say why not when it fails."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check(
            "onnxruntime", "CUDA session", f"no: onnxruntime does not import ({exc})", "fail"
        )
    from xrwatch.engine import cuda_unavailable_reason

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return Check(
            "onnxruntime",
            "CUDA session",
            "no: this onnxruntime build has no CUDA provider "
            "(onnxruntime-gpu exists for Linux x86_64 and Windows)",
            "warn",
        )
    unavailable = cuda_unavailable_reason()  # also preloads CUDA/cuDNN from pip wheels
    if unavailable is not None:
        return Check("onnxruntime", "CUDA session", f"no: {unavailable}", "warn")
    import numpy as np

    def create() -> object:
        options = ort.SessionOptions()
        options.log_severity_level = 2  # warnings and errors reach fd 2, where we read them
        session = ort.InferenceSession(
            tiny_onnx_model(), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        if "CUDAExecutionProvider" not in session.get_providers():
            return session
        out = session.run(None, {"x": np.ones((1, 4), np.float32)})[0]
        if not np.allclose(out, 2.0):
            raise RuntimeError(f"CUDA session ran but computed {out!r} for 1 + 1")
        return session

    result, log = _capture_fd2(create)
    if isinstance(result, Exception):
        return Check("onnxruntime", "CUDA session", f"no: {result}"[:600], "warn")
    providers = result.get_providers()  # type: ignore[attr-defined]
    if "CUDAExecutionProvider" in providers:
        return Check(
            "onnxruntime", "CUDA session", "yes: created and ran a test model on CUDA", "ok"
        )
    return Check("onnxruntime", "CUDA session", f"no: {cuda_failure_reason(log)}", "warn")


def _cpu_check() -> Check:
    """The CPU and the ISA features int8/fp32 inference speed depends on (xrwatch.sysinfo)."""
    from xrwatch.sysinfo import describe_cpu

    return Check("system", "CPU", describe_cpu(), "info")


def _gpu_driver() -> Check:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            first = fh.readline().strip()
    except OSError:
        return Check("system", "NVIDIA driver", "not found (/proc/driver/nvidia/version)", "info")
    return Check("system", "NVIDIA driver", first, "info")


def collect_checks(*, cuda: bool = True) -> list[Check]:
    """Every row of the doctor's table, in order."""
    checks = [
        Check("system", "python", f"{platform.python_version()} ({sys.executable})", "info"),
        Check("system", "platform", platform.platform(), "info"),
        _cpu_check(),
        _gpu_driver(),
        Check("packages", "xrwatch", __version__, "ok"),
    ]
    for dist, core in PACKAGES:
        version = _version(dist)
        if version:
            checks.append(Check("packages", dist, version, "ok"))
        else:
            note = "missing (core dependency)" if core else "not installed (optional)"
            checks.append(Check("packages", dist, note, "fail" if core else "info"))
    ort_versions = [(d, _version(d)) for d in ORT_DISTRIBUTIONS]
    found = [f"{d} {v}" for d, v in ort_versions if v]
    if not found:
        checks.append(Check("packages", "onnxruntime", "missing (core dependency)", "fail"))
    else:
        both = len(found) > 1
        note = " - both installed: they overwrite each other, keep one" if both else ""
        checks.append(
            Check("packages", "onnxruntime", ", ".join(found) + note, "warn" if both else "ok")
        )
    checks.extend(_ort_checks(cuda=cuda))
    checks.extend(_dicom_checks())
    checks.append(default_model_check())
    checks += _default_population()
    torch_version = _version("torch")
    if importlib.util.find_spec("torch") is not None:
        value = (
            f"installed ({torch_version or 'unknown version'}): `xrwatch train`/`export` "
            "can run; serving never imports it"
        )
    else:
        value = (
            "not installed: serving works; `xrwatch train`/`export` need "
            "pip install 'xrwatch[train]'"
        )
    checks.append(Check("torch", "torch", value, "info"))
    return checks


def _default_population() -> list[Check]:
    """The population row of the shipped default (nothing when there is none)."""
    from xrwatch import defaults
    from xrwatch.errors import XRWatchError
    from xrwatch.modelmeta import read_model_metadata

    shipped = defaults.default_model()
    if shipped is None:
        return []
    try:
        return [population_check(read_model_metadata(shipped))]
    except XRWatchError:
        return []  # default_model_check reports it


def default_model_check() -> Check:
    """Which model serve/classify/evaluate use when given no --model."""
    from xrwatch import defaults
    from xrwatch.errors import XRWatchError
    from xrwatch.modelmeta import read_model_metadata

    shipped = defaults.default_model()
    if shipped is None:
        return Check("model", "default", "none shipped: pass --model MODEL.onnx", "warn")
    try:
        meta = read_model_metadata(shipped)
    except XRWatchError as exc:
        return Check("model", "default", f"{shipped}: unusable: {exc}", "fail")
    return Check(
        "model",
        "default",
        f"{shipped} ({meta.name}, classes {', '.join(meta.classes)}, input {meta.spec.size} px, "
        f"sha256 {meta.model_sha256[:12]}); card {defaults.DEFAULT_CARD.name}; --model overrides",
        "ok",
    )


def population_check(meta: ModelMeta) -> Check:
    """Who the default model is for (its ``xrwatch.population``), said plainly."""
    gate = meta.population
    if gate is None:
        return Check("model", "population", "not stated by the model (no population gate)", "warn")
    stated = gate.get("population") or "its training population"
    return Check(
        "model",
        "population",
        f"for {stated}; not for adults: films with DICOM age >= "
        f"{gate.get('adult_age_years', 18):g} y, or without an age whose image scores "
        f"{gate.get('output', 'population')} >= {gate.get('threshold')}, are flagged "
        "out_of_population",
        "ok",
    )


def _ort_checks(*, cuda: bool) -> list[Check]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return [Check("onnxruntime", "import", f"fails: {exc}", "fail")]
    # get_device() names what the package was built for, not a device found on this machine
    build = str(ort.get_device())
    if build.startswith("GPU"):
        where = "the CUDA session row" if cuda else "run doctor without --no-cuda"
        build = f"{build} (CUDA): can use an NVIDIA GPU; whether one is usable here: {where}"
    else:
        build = f"{build}: runs on the CPU only"
    rows = [
        Check("onnxruntime", "build", build, "info"),
        Check("onnxruntime", "providers", ", ".join(ort.get_available_providers()), "ok"),
    ]
    if cuda:
        rows.append(cuda_session_check())
    return rows


def _dicom_checks() -> list[Check]:
    try:
        from pydicom.pixels import get_decoder
        from pydicom.uid import UID
    except ImportError as exc:
        return [Check("DICOM pixel plugins", "pydicom", f"does not import: {exc}", "fail")]
    rows = []
    for uid in DICOM_SYNTAXES:
        name = UID(uid).name
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            rows.append(Check("DICOM pixel plugins", name, "no decoder in this pydicom", "fail"))
            continue
        if decoder.is_available:
            plugins = ", ".join(decoder.available_plugins) or "built in (no plugin needed)"
            rows.append(Check("DICOM pixel plugins", name, plugins, "ok"))
        else:
            missing = "; ".join(decoder.missing_dependencies)
            rows.append(
                Check("DICOM pixel plugins", name, f"cannot decode (needs {missing})", "fail")
            )
    return rows


_STYLE = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "info": ""}


@app.command("doctor")
def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as a JSON list."),
    no_cuda: bool = typer.Option(False, "--no-cuda", help="Skip the CUDA session test."),
    log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
    triton: str | None = typer.Option(
        None, "--triton", help="Also check these Triton servers (grpc://HOST:PORT,...)."
    ),
    triton_model: str = typer.Option(
        "xrwatch", "--triton-model", help="The served model: NAME or NAME:VERSION."
    ),
) -> int:
    """Show what this installation can do, in one table.

    Python and package versions, the CPU and its ISA features (AVX2, AVX-512, VNNI, AMX:
    what int8 speed depends on), the ONNX Runtime providers and whether a CUDA session
    really works (and why not), the DICOM pixel-data plugins, and whether torch is
    installed. Exit 1 if something serving needs is missing.
    """
    configure_logging(log_level)
    checks = collect_checks(cuda=not no_cuda)
    if triton is not None:  # each server: ready, the model it serves, one inference
        from xrwatch.remote.options import triton_doctor_rows

        checks += [Check(*row) for row in triton_doctor_rows(triton, triton_model)]
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"xrwatch {__version__} doctor", title_justify="left")
        table.add_column("section", style="bold")
        table.add_column("item")
        table.add_column("value", overflow="fold")
        table.add_column("", no_wrap=True)
        previous = None
        for c in checks:
            table.add_row(  # values quote paths and library logs: no markup in them
                c.section if c.section != previous else "",
                escape(c.item),
                escape(c.value),
                _STYLE[c.status],
            )
            previous = c.section
        console.print(table)
    failed = [c for c in checks if c.status == "fail"]
    return EXIT_FAILED if failed else EXIT_OK
