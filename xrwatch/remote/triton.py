"""Run xrwatch's model on a Triton Inference Server fleet over gRPC (``xrwatch[triton]``).

:class:`TritonEngine` is an :class:`~xrwatch.engine.InferenceEngine` whose ONNX Runtime
session is replaced by :class:`TritonFleet`, an object with the session's interface
(``get_inputs``, ``get_outputs``, ``run``, ``get_providers``) that sends each batch to a
server. Everything else - preprocessing, flags, heatmaps, results - is the local engine's
own code, so reports are those of a local run of the same model.

The model's metadata (classes, preprocessing, calibration, scope guard) comes from the
served model's config parameters (:mod:`xrwatch.remote.repository`), never from a local
file. The engine checks the served model: its name, its version (the one the parameters
describe, pinned for the whole run), its weights hash (``xrwatch.model_sha256``; equal to
``expect_sha256`` when given) and that every server of the fleet serves the same one.

Fleet behaviour: each batch goes to the next server in turn that is not backing off; a
server that fails or does not answer within ``timeout`` is left alone for a back-off that
doubles with each failure (0.25 s up to 30 s) and the batch is sent to another. A server
that failed is checked again (same model, same weights) before it gets another batch. When
no server answers for ``retry_for`` seconds the batch raises :class:`ModelError` (the
daemon keeps its files claimed and retries; ``classify`` reports the error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch import flags
from xrwatch.engine import INPUT_NAME, InferenceEngine
from xrwatch.errors import ConfigError, ModelError, ModelMetadataError, require_extra
from xrwatch.modelmeta import ModelMeta, parse_metadata
from xrwatch.remote.repository import KEY_MODEL_SHA256, KEY_MODEL_VERSION, parameters_from_config

logger = logging.getLogger(__name__)

PROVIDER = "triton"
DEFAULT_PORT = 8001  # Triton's gRPC port
DEFAULT_TIMEOUT = 60.0  # seconds one request may take before the server counts as failed
DEFAULT_RETRY_FOR = 60.0  # seconds a batch is retried across the fleet before it fails
PROBE_TIMEOUT = 5.0  # seconds for the questions that check a server (not inference)
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
_MAX_BATCH = "triton.max_batch_size"  # not parameters: read from the config's own fields
_PER_IMAGE = "triton.per_image_outputs"


def parse_urls(text: str) -> tuple[str, ...]:
    """``grpc://host:8001,grpc://host2:8001`` -> ``("host:8001", "host2:8001")``."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        scheme, sep, rest = part.partition("://")
        if not sep:
            scheme, rest = "grpc", part
        if scheme != "grpc":
            raise ConfigError(f"--triton {part!r}: only grpc:// URLs are supported")
        host, colon, port = rest.rstrip("/").rpartition(":")
        if not colon:
            host, port = rest.rstrip("/"), str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--triton {part!r}: expected grpc://HOST:PORT")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise ConfigError("--triton: no server URL given")
    if len(set(out)) != len(out):
        raise ConfigError(f"--triton: a server is named twice: {text!r}")
    return tuple(out)


def parse_model(text: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION`` -> ``(name, version or None)``."""
    name, colon, version = text.partition(":")
    if not name or (colon and not version.isdigit()):
        raise ConfigError(f"--triton-model {text!r}: expected NAME or NAME:VERSION")
    return name, version or None


@dataclass
class _Server:
    url: str
    client: Any
    verified: bool = False
    refused: str | None = None  # why it is never used: it serves another model
    failures: int = 0  # in a row
    retry_at: float = 0.0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0  # total request time
    last_error: str | None = None

    def state(self, now: float) -> str:
        """``ready``; ``backing_off`` (failed, left alone until ``retry_at``); ``failing``
        (failed, the next batch tries it); ``unverified`` (not reached yet); ``refused``."""
        if self.refused:
            return "refused"
        if self.failures:
            return "backing_off" if self.retry_at > now else "failing"
        return "ready" if self.verified else "unverified"


@dataclass(frozen=True)
class _Port:
    """An input or output as ONNX Runtime's ``NodeArg`` shows it."""

    name: str
    shape: list[Any] = field(default_factory=list)


class TritonFleet:
    """The served model on one or more Triton servers, with ONNX Runtime's session interface."""

    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        *,
        version: str | None = None,
        expect_sha256: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry_for: float = DEFAULT_RETRY_FOR,
    ) -> None:
        require_extra("triton", "tritonclient")
        import tritonclient.grpc as grpcclient

        if timeout <= 0 or retry_for < 0:
            raise ValueError("timeout must be > 0 and retry_for >= 0")
        self.model = model
        self.version = version
        self.expect_sha256 = expect_sha256
        self.timeout = timeout
        self.retry_for = retry_for
        self._grpc = grpcclient
        self._servers = [_Server(u, grpcclient.InferenceServerClient(u)) for u in urls]
        self._lock = threading.Lock()
        self._next = 0
        self.props, self._inputs, self._outputs = self._connect()
        self.version = self.props[KEY_MODEL_VERSION]
        self.max_batch = int(self.props.pop(_MAX_BATCH)) or None  # None: the server does not batch
        self.per_image = frozenset(filter(None, self.props.pop(_PER_IMAGE).split(",")))
        for port in self._outputs:
            if port.name in self.per_image:  # [N, 1] as Triton says -> [N] as in the file
                port.shape[:] = port.shape[:1]
        self.where = f"triton:{self.model}@{self.version}"
        self.meta: ModelMeta = parse_metadata(
            self.props, path=self.where, model_sha256=self.props[KEY_MODEL_SHA256]
        )

    # -- checking what a server serves ------------------------------------------------------

    def _describe(self, server: _Server) -> tuple[dict[str, str], dict[str, Any]]:
        """The served model's parameters and metadata; raises when it is not ready."""
        t = min(self.timeout, PROBE_TIMEOUT)  # a server that does not answer costs little
        cfg = server.client.get_model_config(self.model, as_json=True, client_timeout=t)
        config = cfg.get("config", {})
        props = parameters_from_config(config)
        props[_MAX_BATCH] = str(config.get("max_batch_size", 0))
        # one value per image ([N] in the file) is declared dims [1], reshape to none
        per_image = [
            o["name"]
            for o in config.get("output", [])
            if "reshape" in o and not (o["reshape"] or {}).get("shape")
        ]
        props[_PER_IMAGE] = ",".join(per_image)
        missing = [k for k in (KEY_MODEL_SHA256, KEY_MODEL_VERSION) if k not in props]
        if missing:
            raise ModelMetadataError(
                f"triton {server.url} model {self.model!r}: its config lacks the parameters "
                f"{', '.join(missing)} (write the repository with `xrwatch export --triton`)"
            )
        served = props[KEY_MODEL_VERSION]
        if not server.client.is_model_ready(self.model, served, client_timeout=t):
            raise ModelError(f"triton {server.url}: model {self.model!r} {served} is not ready")
        md = server.client.get_model_metadata(self.model, served, as_json=True, client_timeout=t)
        return props, md

    def _mismatch(self, props: Mapping[str, str], reference: Mapping[str, str] | None) -> str:
        """Why ``props`` is not the model expected ('' when it is)."""
        served, sha = props[KEY_MODEL_VERSION], props[KEY_MODEL_SHA256]
        if self.version is not None and served != self.version:
            return f"serves version {served} of {self.model!r}, expected version {self.version}"
        if self.expect_sha256 is not None and sha != self.expect_sha256:
            return f"serves weights sha256 {sha}, expected {self.expect_sha256}"
        if reference is not None and (
            served != reference[KEY_MODEL_VERSION] or sha != reference[KEY_MODEL_SHA256]
        ):
            return (
                f"serves version {served} (sha256 {sha[:12]}) but the fleet serves version "
                f"{reference[KEY_MODEL_VERSION]} (sha256 {reference[KEY_MODEL_SHA256][:12]})"
            )
        return ""

    def _connect(self) -> tuple[dict[str, str], list[_Port], list[_Port]]:
        """Ask every server what it serves until one answers (within ``retry_for``)."""
        deadline = time.monotonic() + self.retry_for
        delay = BACKOFF_FIRST
        while True:
            found: list[tuple[_Server, dict[str, str], dict[str, Any]]] = []
            errors = []
            for server in self._servers:
                try:
                    props, md = self._describe(server)
                except ModelMetadataError:
                    raise
                except Exception as exc:
                    server.last_error = _short(exc)
                    errors.append(f"{server.url}: {server.last_error}")
                    continue
                found.append((server, props, md))
            if found:
                break
            if time.monotonic() + delay > deadline:
                raise ModelError(
                    f"no Triton server serves model {self.model!r}: " + "; ".join(errors)
                )
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        reference: dict[str, str] | None = None
        wrong = []
        for server, props, _ in found:
            why = self._mismatch(props, reference)
            if why:
                wrong.append(f"{server.url} {why}")
            elif reference is None:
                reference = props
            server.verified = not why
        if wrong:  # a fleet serving two models, or not the one asked for: refuse it all
            raise ModelError(f"triton model {self.model!r}: " + "; ".join(wrong))
        assert reference is not None
        for server in self._servers:
            if not server.verified:
                logger.warning(
                    "triton server %s not reachable yet: %s", server.url, server.last_error
                )
        md = next(m for s, p, m in found if p is reference)
        return reference, _ports(md["inputs"]), _ports(md["outputs"])

    def _verify(self, server: _Server) -> None:
        """Check a server before it gets a batch: the fleet's model, version and weights."""
        try:
            props, _ = self._describe(server)
        except ModelMetadataError as exc:  # not an xrwatch repository: never used again
            server.refused = str(exc)
            raise
        why = self._mismatch(props, self.props)
        if why:
            server.refused = why
            logger.error("triton server %s is not used: it %s", server.url, why)
            raise ModelError(f"triton {server.url} {why}")
        server.verified = True

    # -- ONNX Runtime's session interface -----------------------------------------------------

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def _candidates(self) -> list[_Server]:
        """The servers to try for the next batch, in turn, skipping those backing off."""
        with self._lock:
            now = time.monotonic()
            n = len(self._servers)
            start = self._next
            self._next = (self._next + 1) % n
            order = [self._servers[(start + i) % n] for i in range(n)]
            return [s for s in order if not s.refused and s.retry_at <= now]

    def _infer(self, server: _Server, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        if not server.verified:
            self._verify(server)
        grpc = self._grpc
        data = grpc.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        data.set_data_from_numpy(batch)
        started = time.monotonic()
        result = server.client.infer(
            self.model,
            [data],
            model_version=self.version,
            outputs=[grpc.InferRequestedOutput(n) for n in names],
            client_timeout=self.timeout,
        )
        values = []
        for name in names:
            value = np.asarray(result.as_numpy(name), dtype=np.float32)
            if name in self.per_image:
                value = value.reshape(-1)
            if value.shape[0] != batch.shape[0]:
                raise ModelError(
                    f"triton {server.url}: output {name!r} has {value.shape[0]} rows "
                    f"for {batch.shape[0]} images"
                )
            values.append(value)
        with self._lock:
            server.requests += 1
            server.seconds += time.monotonic() - started
            server.failures = 0
        return values

    def _failed(self, server: _Server, exc: Exception) -> None:
        with self._lock:
            server.errors += 1
            server.failures += 1
            server.verified = False  # it may come back with another model
            server.last_error = _short(exc)
            pause = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (server.failures - 1))
            server.retry_at = time.monotonic() + pause
        logger.warning(
            "triton server %s failed (%s); not used for %.2f s",
            server.url,
            server.last_error,
            pause,
        )

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``names`` for ``feed[INPUT_NAME]``, in requests of at most the
        server's ``max_batch_size`` images, each from whichever server answers."""
        batch = np.ascontiguousarray(feed[INPUT_NAME], dtype=np.float32)
        step = self.max_batch or len(batch)
        parts = [self._run_one(names, batch[i : i + step]) for i in range(0, len(batch), step)]
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(values) for values in zip(*parts, strict=True)]

    def _run_one(self, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        deadline = time.monotonic() + self.retry_for
        delay = BACKOFF_FIRST
        while True:
            for server in self._candidates():
                try:
                    return self._infer(server, names, batch)
                except Exception as exc:
                    self._failed(server, exc)
            now = time.monotonic()
            if now >= deadline:
                raise ModelError(
                    f"triton model {self.model!r}: no server answered for {self.retry_for:.0f} s: "
                    + "; ".join(f"{s.url}: {s.refused or s.last_error}" for s in self._servers)
                )
            with self._lock:
                waits = [s.retry_at - now for s in self._servers if not s.refused]
            if not waits:
                raise ModelError(f"triton model {self.model!r}: every server serves another model")
            time.sleep(max(0.0, min(max(delay, min(waits)), deadline - now)))
            delay = min(delay * 2, BACKOFF_MAX)

    def servers(self) -> list[dict[str, Any]]:
        """Each server's state and counters, for ``status``, health and metrics."""
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "url": f"grpc://{s.url}",
                    "state": s.state(now),
                    "requests": s.requests,
                    "errors": s.errors,
                    "seconds": round(s.seconds, 6),
                    "last_error": s.refused or s.last_error,
                }
                for s in self._servers
            ]

    def close(self) -> None:
        for server in self._servers:
            try:
                server.client.close()
            except Exception as exc:  # closing a dead channel
                logger.debug("closing triton client %s: %s", server.url, exc)


def _ports(items: Sequence[Mapping[str, Any]]) -> list[_Port]:
    """Triton's metadata tensors as ONNX Runtime's NodeArgs (-1 -> a named dimension)."""
    return [
        _Port(
            str(item["name"]),
            [int(d) if int(d) >= 0 else "batch" for d in item.get("shape", [])],
        )
        for item in items
    ]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class TritonEngine(InferenceEngine):
    """An :class:`InferenceEngine` whose model runs on a Triton fleet (see the module doc)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str = "xrwatch",
        *,
        version: str | None = None,
        expect_sha256: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry_for: float = DEFAULT_RETRY_FOR,
        low_confidence: float | None = None,
        scope_guard: str = "combined",
    ) -> None:
        """Connect to ``urls`` (``grpc://host:port``, a list or comma-separated) serving
        ``model`` (``version``: pin one; default the version its config describes).

        Raises :class:`ModelError` when no server serves the model, or one serves another
        model (version or weights) than expected or than the rest of the fleet.
        """
        if scope_guard not in flags.SCOPE_GUARDS:
            raise ValueError(
                f"scope_guard must be one of {flags.SCOPE_GUARDS}, got {scope_guard!r}"
            )
        servers = parse_urls(urls if isinstance(urls, str) else ",".join(urls))
        self._session: TritonFleet = TritonFleet(
            servers,
            model,
            version=version,
            expect_sha256=expect_sha256,
            timeout=timeout,
            retry_for=retry_for,
        )
        fleet = self._session
        self.meta = fleet.meta
        self.path = Path(fleet.where)
        self.model_sha256 = fleet.meta.model_sha256
        self._check_signature()
        self._init_extras(low_confidence, scope_guard)
        self.providers: tuple[str, ...] = (PROVIDER,)
        self.provider: str = PROVIDER
        logger.info(
            "model %s version %s (%s, %d classes, input %dx%d, sha256 %s) on Triton %s",
            model,
            fleet.version,
            self.meta.name,
            len(self.classes),
            self.spec.size,
            self.spec.size,
            self.model_sha256[:12],
            ", ".join(servers),
        )

    @property
    def fleet(self) -> TritonFleet:
        return self._session

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "triton": {
                "model": self.fleet.model,
                "version": self.fleet.version,
                "servers": self.fleet.servers(),
            },
        }

    def collector(self) -> Any:
        """A prometheus-client collector of the fleet's readiness, latency and errors."""
        from xrwatch.remote.metrics import FleetCollector

        return FleetCollector(self.fleet)

    def health(self) -> tuple[bool, str]:
        """Whether some server is usable (answered last time, or not tried yet), and why."""
        servers = self.fleet.servers()
        usable = [s["url"] for s in servers if s["state"] in ("ready", "unverified")]
        if usable:  # states are as the last batch found them; an idle daemon asks nobody
            return True, f"{len(usable)}/{len(servers)} server(s) usable"
        return False, "no server usable: " + "; ".join(
            f"{s['url']} {s['state']} ({s['last_error']})" for s in servers
        )

    def close(self) -> None:
        self.fleet.close()
