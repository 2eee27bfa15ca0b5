"""Start the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel, on loopback.

The wheel ships Triton 2.51 with only the Python backend, and one Python-backend stub per
Python version. What it takes to run it on a CPU-only machine (found the hard way):

* a *server environment*: a virtual environment, of a Python whose stub the wheel ships
  and that has ``libpython3.X.so`` (pyenv builds do), holding ``nvidia-pytriton``
  (``--no-deps``), ``onnxruntime`` and ``numpy<2``. With numpy 2 the stub answers every
  output with zero bytes (its bindings are built against numpy 1). Python 3.12.1 works;
  the 3.11.7 stub failed to start here (``'_thread.RLock' object has no attribute
  '_recursion_count'``);
* ``LD_LIBRARY_PATH`` naming the wheel's ``nvidia_pytriton.libs`` (the stub links
  ``libcudart``) and the Python's ``lib`` folder;
* the packages reach the model through ``XRWATCH_TRITON_SITE``: the stub's interpreter
  ignores ``PYTHONPATH`` (see :mod:`xrwatch.remote.triton_model`).

:class:`LocalTriton` starts one server process on ``127.0.0.1`` (gRPC only, HTTP and
metrics off), waits until it is ready, and stops or ``kill -9``s it. Tests and
``benchmarks/triton_serve.py`` use it; docs/triton.md says how to make the environment.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from xrwatch.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_VAR = "XRWATCH_TRITON_ENV"  # the server environment's folder
SITE_ENV = "XRWATCH_TRITON_SITE"  # read by xrwatch.remote.triton_model


@dataclass(frozen=True)
class ServerEnv:
    """The files of one server environment (see the module docstring)."""

    root: Path
    server: Path  # the tritonserver binary
    backend: Path  # backends/python: libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python
    python_home: Path
    site_packages: Path
    lib_dirs: tuple[Path, ...]


def _pyvenv(root: Path) -> dict[str, str]:
    cfg = root / "pyvenv.cfg"
    if not cfg.is_file():
        raise ConfigError(f"{root}: not a virtual environment (no pyvenv.cfg)")
    out = {}
    for line in cfg.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def find_server_env(root: Path) -> ServerEnv:
    """Check the server environment at ``root``; :class:`ConfigError` says what is wrong."""
    cfg = _pyvenv(root)
    version = cfg.get("version_info") or cfg.get("version") or ""
    major_minor = ".".join(version.split(".")[:2])
    home = Path(cfg.get("home", "")).parent
    site_packages = root / "lib" / f"python{major_minor}" / "site-packages"
    package = site_packages / "pytriton" / "tritonserver"
    server = package / "bin" / "tritonserver"
    stub = package / "python_backend_stubs" / major_minor / "triton_python_backend_stub"
    libs = site_packages / "nvidia_pytriton.libs"
    libpython = home / "lib" / f"libpython{major_minor}.so.1.0"
    for path, what in (
        (server, "the tritonserver binary (pip install --no-deps nvidia-pytriton)"),
        (stub, f"a Python backend stub for Python {major_minor}"),
        (libpython, f"libpython{major_minor} (a Python built with --enable-shared)"),
    ):
        if not path.is_file():
            raise ConfigError(f"{root}: missing {what}: {path}")
    numpys = sorted(site_packages.glob("numpy-*.dist-info"))
    if not numpys:
        raise ConfigError(f"{root}: numpy is not installed (pip install 'numpy<2')")
    if not numpys[-1].name.startswith("numpy-1."):
        raise ConfigError(
            f"{root}: has {numpys[-1].name}; the Triton Python stub needs numpy 1 "
            "(pip install 'numpy<2'): with numpy 2 its outputs come back empty"
        )
    if not list(site_packages.glob("onnxruntime-*.dist-info")):
        raise ConfigError(f"{root}: onnxruntime is not installed")
    return ServerEnv(
        root=root,
        server=server,
        backend=package / "backends" / "python",
        stub=stub,
        python_home=home,
        site_packages=site_packages,
        lib_dirs=(libs, home / "lib"),
    )


def default_env_root() -> Path | None:
    """``$XRWATCH_TRITON_ENV``, else ``tritonenv`` beside the checkout, if it exists."""
    named = os.environ.get(ENV_VAR)
    if named:
        return Path(named)
    beside = Path(__file__).resolve().parents[3] / "tritonenv"
    return beside if beside.is_dir() else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalTriton:
    """One ``tritonserver`` process serving ``repository`` on ``127.0.0.1:<port>`` (gRPC)."""

    def __init__(
        self, env: ServerEnv, repository: Path, workdir: Path, *, port: int | None = None
    ) -> None:
        self.env = env
        self.repository = repository
        self.workdir = workdir
        self.port = port or free_port()
        self.log_path = workdir / f"tritonserver-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _backend_dir(self) -> Path:
        """A backend folder holding the Python backend with the stub for this Python."""
        folder = self.workdir / "backends" / "python"
        folder.mkdir(parents=True, exist_ok=True)
        for src in (*self.env.backend.iterdir(), self.env.stub):
            dst = folder / src.name
            if src.is_file() and not dst.exists():
                dst.symlink_to(src)
        return folder.parent

    def start(self, *, timeout: float = 120.0) -> LocalTriton:
        """Start the server and wait until it and its models are ready."""
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": os.pathsep.join(str(p) for p in self.env.lib_dirs),
            "PYTHONHOME": str(self.env.python_home),
            SITE_ENV: str(self.env.site_packages),
        }
        args = [
            str(self.env.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backend_dir()}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its stubs go with it when the group is killed
        )
        self.wait_ready(timeout)
        logger.info("tritonserver pid %d ready on %s", self._proc.pid, self.url)
        return self

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    self._reap()
                    raise ConfigError(f"tritonserver exited while starting: {self.log_tail()}")
                try:
                    if client.is_server_ready(client_timeout=2.0):
                        return
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(
                        f"tritonserver not ready after {timeout:.0f} s: {self.log_tail()}"
                    )
                time.sleep(0.2)
        finally:
            client.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill9(self) -> None:
        """``kill -9`` the server and its stubs, as a crash would."""
        self._signal_group(signal.SIGKILL)
        self._reap()

    def pause(self) -> None:
        """``SIGSTOP`` the server: it keeps its port but answers nothing (a hung server)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; idempotent."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # a paused server could not act on SIGTERM
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver pid %d ignored SIGTERM; killing it", self._proc.pid)
        self._signal_group(signal.SIGKILL)  # whatever is left of the group (stubs)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                logger.error("tritonserver pid %d did not exit", self._proc.pid)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalTriton:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
