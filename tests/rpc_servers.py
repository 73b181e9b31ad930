"""A TVM RPC tracker and servers on 127.0.0.1 in subprocesses, for the tests of remote tuning
and of sweeps on remote devices."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fgq_tvm.errors import FGQError
from fgq_tvm.remote import RemoteDevice

KEY = "fgq-test"
STARTUP_S = 90  # a busy 2-core machine imports TVM in each process
LOADED = re.compile(r"load_module (\S+)/([^/\s]+)$")  # a server's log line per loaded module


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ports(port: int) -> list[str]:
    """``--port PORT --port-end PORT+1``: the one port a tracker or server listens on."""
    return ["--port", str(port), "--port-end", str(port + 1)]


def _start(arguments: list[str], log: Path) -> subprocess.Popen:
    """``python -m tvm.exec.<arguments>`` in a process group of its own, output to ``log``."""
    with open(log, "w") as file:
        return subprocess.Popen(
            [sys.executable, "-m", *arguments], stdout=file, stderr=subprocess.STDOUT,
            env={**os.environ, "TVM_NUM_THREADS": "1"}, start_new_session=True,
        )  # fmt: skip


def _stop(process: subprocess.Popen) -> None:
    """End the process and what it forked (its sessions): its whole process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class Servers:
    """A tracker and two servers under :data:`KEY` on 127.0.0.1, with their logs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        port = free_port()
        self.device = RemoteDevice("127.0.0.1", port, KEY, workers=2)
        tracker = ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", *_ports(port)]
        self.processes = [_start(tracker, folder / "tracker.log")]
        self.logs = [folder / f"server{i}.log" for i in range(2)]
        server = ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--tracker", self.device.address]
        for log in self.logs:
            self.processes.append(_start([*server, "--key", KEY, *_ports(free_port())], log))

    def wait(self) -> None:
        """Until both servers are registered (or fail with the processes' logs)."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.processes), self._logs()
            try:
                if self.device.servers() == 2:
                    return
            except FGQError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the RPC servers did not register in {STARTUP_S} s: {self._logs()}")

    def loaded(self) -> list[tuple[str, str]]:
        """``(session folder, file)`` of each module the servers loaded so far."""
        lines = [line for log in self.logs for line in log.read_text().splitlines()]
        return [match.groups() for line in lines if (match := LOADED.search(line))]

    def kill_server(self, index: int) -> None:
        """Kill server ``index`` (0 or 1) and its sessions at once, as a crash would."""
        os.killpg(self.processes[1 + index].pid, signal.SIGKILL)
        self.processes[1 + index].wait(timeout=10)

    def stop(self) -> None:
        for process in reversed(self.processes):
            _stop(process)

    def _logs(self) -> str:
        return " | ".join(path.read_text() for path in sorted(self.folder.glob("*.log")))


@contextlib.contextmanager
def running_servers(folder: Path) -> Iterator[Servers]:
    """:class:`Servers` in ``folder``, registered, and stopped at the end whatever happens."""
    servers = Servers(folder)
    try:
        servers.wait()
        yield servers
    finally:
        servers.stop()
