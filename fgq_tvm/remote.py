"""Where built kernels and compiled modules run: this machine, or a device registered with TVM's
RPC tracker.

Devices
    :data:`LOCAL_DEVICE` is this machine. A :class:`RemoteDevice` is the servers registered
    under one key with a tracker (``python -m tvm.exec.rpc_tracker``, ``python -m
    tvm.exec.rpc_server --tracker HOST:PORT --key KEY``): tuning times candidates there through
    MetaSchedule's RPC runner (:meth:`RemoteDevice.runner`), and verifies and compares kernels
    there (:meth:`RemoteDevice.session`).
Sessions
    Code is built here. A :class:`LocalSession` (:data:`LOCAL`) loads it into this process; a
    :class:`RemoteSession` exports it to a temporary ``.so``, uploads it to the server, loads it
    there and places tensors in the server's memory. Both time a :class:`Call` in the rounds of
    :func:`~fgq_tvm.timing.time_rounds`: here by the wall clock, there by the server's own
    ``time_evaluator`` (an RPC round trip would dwarf a small kernel).
Errors
    A tracker that cannot be reached, a key without a server and a session that fails are
    :class:`~fgq_tvm.errors.FGQError`\\ s of one line that say what to start. A tracker queues a
    request for a key until one of its servers is free, forever where there is none: every
    session first checks that the key has a server.

TVM is imported inside the functions that need it: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .errors import FGQError, UsageError, brief
from .timing import Timer

if TYPE_CHECKING:
    from collections.abc import Callable

    import tvm

CONNECT_TIMEOUT_S = 10.0  # to reach the tracker
SESSION_TIMEOUT_S = 300  # the longest a server keeps one session (candidate, check, bench)
SESSION_PRIORITY = 1  # MetaSchedule's RPC runner asks with the same
UPLOADED = "fgq-"  # + a number + ".so": the modules a session uploads, in the server's logs
_CPU, _POOLED = 1, 2  # DLPack device type, and the Relax VM's pooled allocator


@dataclass(frozen=True)
class Call:
    """A function of a loaded module with its arguments: calling it runs the function once."""

    module: tvm.runtime.Module
    arguments: tuple
    name: str = "main"

    def __call__(self) -> object:
        return self.module[self.name](*self.arguments)


@dataclass(frozen=True)
class LoadedModel:
    """A compiled fgq-tvm module loaded on a device with its input: ``run()`` returns the
    logits as NumPy; ``timer`` times one inference on the device (``None``: the wall clock
    here times ``run``)."""

    run: Callable[[], np.ndarray]
    timer: Timer | None = None


class LocalSession:
    """This machine: built code runs in this process."""

    @property
    def device(self) -> tvm.runtime.Device:
        import tvm

        return tvm.cpu()

    def load(self, executable: tvm.runtime.Executable) -> tvm.runtime.Module:
        """``executable`` linked into this process."""
        return executable.jit()

    def tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        """A copy of ``array`` in this process's memory."""
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array))

    def timers(self, calls: Mapping[str, Call]) -> dict[str, Timer]:
        """None: :func:`~fgq_tvm.timing.time_rounds` times calls here by the wall clock."""
        return {}

    def load_model(self, path: Path, x: np.ndarray) -> LoadedModel:
        """The module ``path`` (and its sidecar) loaded by :func:`fgq_tvm.runtime.load`, on
        ``x``."""
        from .runtime import load

        model = load(path)
        return LoadedModel(lambda: model(x))


LOCAL = LocalSession()


class RemoteSession:
    """A session on one server of a :class:`RemoteDevice`; open it with
    :meth:`RemoteDevice.session`.

    Attributes
    ----------
    uploads
        How many modules it uploaded (:data:`UPLOADED` ``<number>.so``).
    """

    def __init__(self, session: tvm.rpc.RPCSession, folder: Path) -> None:
        self.rpc = session
        self.folder = folder
        self.device = session.cpu()
        self.uploads = 0

    def load(self, executable: tvm.runtime.Executable) -> tvm.runtime.Module:
        """``executable`` exported here, uploaded to the server and loaded there."""
        path = self.folder / f"{UPLOADED}{self.uploads}.so"
        executable.export_library(str(path))
        return self._upload(path)

    def tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        """A copy of ``array`` in the server's memory."""
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array), device=self.device)

    def timers(self, calls: Mapping[str, Call]) -> dict[str, Timer]:
        """Each call's :data:`~fgq_tvm.timing.Timer` by the server's clock: its
        ``time_evaluator`` makes one untimed call and times one."""
        return {name: self._timer(call) for name, call in calls.items()}

    def load_model(self, path: Path, x: np.ndarray) -> LoadedModel:
        """The compiled module ``path`` loaded on the server through the Relax VM (its
        ``prepare`` run once, as :func:`fgq_tvm.runtime.load` does), on ``x``."""
        machine = self._upload(path)["vm_load_executable"]()
        machine["vm_initialization"](_CPU, 0, _POOLED, _CPU, 0, _POOLED)
        call = Call(machine, (self.tensor(x), machine["prepare"]()))
        first = self.rpc.get_function("ffi.ArrayGetItem")  # main returns (logits,)
        return LoadedModel(lambda: first(call(), 0).numpy(), self._timer(call))

    def threads(self) -> int:
        """How many threads the server's TVM runtime runs (its ``TVM_NUM_THREADS``)."""
        return int(self.rpc.get_function("runtime.NumThreads")())

    def _upload(self, path: Path) -> tvm.runtime.Module:
        name = f"{UPLOADED}{self.uploads}.so"
        self.rpc.upload(str(path), name)
        self.uploads += 1
        return self.rpc.load_module(name)

    def _timer(self, call: Call) -> Timer:
        evaluate = call.module.time_evaluator(call.name, self.device, number=1, repeat=1)
        return lambda: float(evaluate(*call.arguments).mean) * 1e3


Session = LocalSession | RemoteSession


@dataclass(frozen=True)
class LocalDevice:
    """This machine: candidates timed by MetaSchedule's local runner, kernels run here."""

    name: ClassVar[str] = "local"

    def session(self, timeout_s: float = 0) -> contextlib.AbstractContextManager[LocalSession]:
        """:data:`LOCAL`, in a context like :meth:`RemoteDevice.session`'s (``timeout_s``:
        unused)."""
        return contextlib.nullcontext(LOCAL)

    def check(self) -> None:
        """Nothing to check: this machine is here."""

    def runner(self, timeout_s: float):
        """MetaSchedule's local runner."""
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.LocalRunner(timeout_sec=timeout_s)

    def verify(self, task, func: tvm.tirx.PrimFunc, target) -> bool:
        """``task.verify(func, target)`` (:meth:`fgq_tvm.tuning.KernelTask.verify`), here."""
        return task.verify(func, target)


LOCAL_DEVICE = LocalDevice()


@dataclass(frozen=True)
class RemoteDevice:
    """The servers registered under ``key`` with the RPC tracker at ``host:port``.

    Attributes
    ----------
    host, port
        The tracker's address.
    key
        The servers' key (``rpc_server --key``).
    workers
        Candidates timed at once by MetaSchedule's RPC runner; ``None``: one per server
        registered under ``key`` when the runner is made.
    """

    host: str
    port: int
    key: str
    workers: int | None = None

    @classmethod
    def parse(cls, tracker: str, key: str, workers: int | None = None) -> RemoteDevice:
        """The device of ``--rpc-tracker HOST:PORT --rpc-key KEY [--rpc-workers N]``.

        Raises
        ------
        UsageError
            ``tracker`` is not ``HOST:PORT``, or ``key`` is empty.
        """
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(
                f"--rpc-tracker takes HOST:PORT, such as 127.0.0.1:9190, not {tracker!r}"
            )
        if not key.strip():
            raise UsageError("--rpc-key must name the servers' key (rpc_server --key)")
        return cls(host, int(port), key, workers)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        """``KEY@HOST:PORT``: what records and reports say timed them."""
        return f"{self.key}@{self.address}"

    def servers(self) -> int:
        """How many servers are registered under :attr:`key` (busy ones included).

        Raises
        ------
        FGQError
            The tracker cannot be reached, or has no server under :attr:`key`.
        """
        registered = f"server:{self.key}"
        count = sum(item["key"] == registered for item in self._summary()["server_info"])
        if not count:
            raise FGQError(
                f"no RPC server under key {self.key} at {self.address}; start one with python -m "
                f"tvm.exec.rpc_server --tracker {self.address} --key {self.key}"
            )
        return count

    def check(self) -> None:
        """:meth:`servers`, for its errors."""
        self.servers()

    @contextlib.contextmanager
    def session(self, timeout_s: float = SESSION_TIMEOUT_S) -> Iterator[RemoteSession]:
        """A session on a free server under :attr:`key` (waiting for one while all are busy),
        with a temporary folder here for the modules it uploads; the server ends it after
        ``timeout_s`` seconds (0: never), or once the session and what it loaded are dropped.

        Raises
        ------
        FGQError
            No server (:meth:`servers`), or the session fails.
        """
        import tvm

        self.servers()
        tracker = tvm.rpc.connect_tracker(self.host, self.port)
        try:
            connection = tracker.request(
                self.key, priority=SESSION_PRIORITY, session_timeout=timeout_s
            )
        except (OSError, RuntimeError) as error:
            raise FGQError(f"cannot open a session on {self.name} ({brief(error)})") from None
        finally:
            tracker.close()
        with tempfile.TemporaryDirectory(prefix="fgq-rpc-") as folder:
            try:
                yield RemoteSession(connection, Path(folder))
            except tvm.error.RPCError as error:
                raise FGQError(f"the session on {self.name} failed ({brief(error)})") from None

    def runner(self, timeout_s: float):
        """MetaSchedule's RPC runner on these servers; each candidate's session ends after
        ``timeout_s`` seconds."""
        from tvm.s_tir import meta_schedule as ms

        config = ms.runner.RPCConfig(
            tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
            session_priority=SESSION_PRIORITY, session_timeout_sec=int(timeout_s),
        )  # fmt: skip
        return ms.runner.RPCRunner(
            config, f_create_session=_runner_session, max_workers=self.workers or self.servers()
        )

    def verify(self, task, func: tvm.tirx.PrimFunc, target) -> bool:
        """``task.verify(func, target)`` (:meth:`fgq_tvm.tuning.KernelTask.verify`) on a
        server."""
        with self.session() as session:
            return task.verify(func, target, session=session)

    def _summary(self) -> dict:
        """The tracker's summary (its servers and queues).

        Raises
        ------
        FGQError
            It cannot be reached (a probe of :data:`CONNECT_TIMEOUT_S` first: TVM's own
            client retries a refused connection for a minute) or does not answer as one.
        """
        from tvm import rpc

        try:
            with socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S):
                pass
            tracker = rpc.connect_tracker(self.host, self.port)
        except OSError as error:
            raise FGQError(
                f"cannot reach the RPC tracker at {self.address} ({error.strerror or error}); "
                f"start one with python -m tvm.exec.rpc_tracker --host {self.host} --port "
                f"{self.port} --port-end {self.port + 1}"
            ) from None
        except RuntimeError as error:
            raise FGQError(f"{self.address} is no RPC tracker ({brief(error)})") from None
        try:
            return tracker.summary()
        finally:
            tracker.close()


Device = LocalDevice | RemoteDevice


def _runner_session(config) -> tvm.rpc.RPCSession:
    """The session of a candidate in MetaSchedule's RPC runner (run in its worker processes),
    refused at once where the key has no server left: the tracker would queue the request
    forever, and the search with it. The candidate then fails, and so does the search's next
    session (:meth:`RemoteDevice.session`), with the one-line error."""
    config.count_num_servers(allow_missing=False)
    return config.connect_server()
