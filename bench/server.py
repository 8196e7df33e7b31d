"""Serve the app with gunicorn (sync workers, 2 x cores + 1) on a free loopback port.

The worker timeout is 900 s so that a slow 1,000-event batch is measured, not killed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_count() -> int:
    return 2 * (os.cpu_count() or 1) + 1


class Server:
    """One gunicorn master we started; stopped by its own pid (SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict, *, log_path: Path, workers: int | None = None):
        self.env = env
        self.workers = workers or worker_count()
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "capacity_portal.wsgi:application",
             "--worker-class", "sync", "--workers", str(self.workers),
             "--bind", f"127.0.0.1:{self.port}", "--timeout", "900", "--graceful-timeout", "5",
             "--backlog", "256", "--log-level", "warning"],
            cwd=BASE_DIR, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer /healthz within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log_file", None):
            self.log_file.close()
            self.log_file = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
