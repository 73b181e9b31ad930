"""How many threads PyTorch and the TVM runtime use: one setting for benchmarks and tuning
(:func:`thread_settings`), and the count compiled modules run with (:func:`choose_threads`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import FGQError

# The variables TVM's runtime reads for its thread count, in its order of precedence.
THREAD_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")
_SIBLINGS = "/sys/devices/system/cpu/cpu{}/topology/thread_siblings_list"


def choose_threads(asked: int | None = None) -> tuple[int, str]:
    """How many threads compiled modules run with, and why.

    ``asked`` wins, then a count the user set in the environment: ``TVM_NUM_THREADS``, else
    ``OMP_NUM_THREADS`` (the variables TVM's runtime reads, in its order). Otherwise one thread
    per CPU core this process may run on (:func:`usable_cpus`; the hyperthreads of a core
    count once). TVM's own default, half the machine's logical CPUs (it assumes two
    hyperthreads per core), leaves cores idle where there are none, as on a VM whose vCPUs are
    cores: on 2 vCPUs it runs one thread, 1.5 to 1.8 times slower than two.

    Parameters
    ----------
    asked
        A count the caller asked for (``load(path, threads=...)``), or ``None``.

    Returns
    -------
    tuple of (int, str)
        The count, and a line that says why, such as ``"2 threads: one per CPU core this
        process may use; set TVM_NUM_THREADS to change"``.

    Raises
    ------
    FGQError
        ``asked`` or the variable is not a positive integer.
    """
    if asked is not None:
        count = parse_threads(asked, "threads")
        return count, f"{_threads(count)}: threads={count} given to load"
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip():
            count = parse_threads(value, name)
            return count, f"{_threads(count)}: {name}={count} in the environment"
    cpus = usable_cpus()
    count = max(len(cores(cpus)), 1)
    shared = f" ({len(cpus)} CPUs, hyperthreads counted once)" if count < len(cpus) else ""
    reason = f"one per CPU core this process may use{shared}; set TVM_NUM_THREADS to change"
    return count, f"{_threads(count)}: {reason}"


def parse_threads(value: object, source: str) -> int:
    """``value`` as a thread count: a positive integer, or its decimal text.

    Parameters
    ----------
    value
        What the user gave.
    source
        Where it came from, named in the error: ``"threads"`` (an argument) or the variable
        (``"TVM_NUM_THREADS"``).

    Raises
    ------
    FGQError
        ``value`` is not a positive integer.
    """
    count = value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        count = int(value)
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    unset = ", or unset it to run one thread per CPU core" if source in THREAD_VARIABLES else ""
    raise FGQError(
        f"{source}={value!r} is not a number of threads: give a positive integer such as 2{unset}"
    )


def usable_cpus() -> list[int]:
    """The logical CPUs the calling thread may run on (its affinity mask, which ``taskset``
    and cgroup cpusets restrict), in order; all of the machine's where there is no mask."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity outside Linux
        return list(range(os.cpu_count() or 1))


def cores(cpus: list[int], siblings: Callable[[int], str | None] | None = None) -> list[list[int]]:
    """The CPU cores that the logical CPUs ``cpus`` belong to, each as its CPUs among
    ``cpus`` (hyperthreads of one core are one core), in the order of their first CPU.

    Parameters
    ----------
    cpus
        Logical CPU numbers.
    siblings
        ``cpu -> "0,8"`` or ``"0-1"``: the CPUs of its core (Linux's ``thread_siblings_list``),
        or ``None`` where unknown (the CPU is then a core of its own). Default: read from
        ``/sys``.
    """
    siblings = siblings or _read_siblings
    groups: dict[frozenset[int], list[int]] = {}
    for cpu in sorted(cpus):
        try:
            core = _cpu_set(siblings(cpu) or str(cpu))
        except ValueError:  # an unreadable list
            core = frozenset([cpu])
        groups.setdefault(core, []).append(cpu)
    return list(groups.values())


def _read_siblings(cpu: int) -> str | None:
    try:
        return Path(_SIBLINGS.format(cpu)).read_text().strip()
    except OSError:
        return None


def _cpu_set(listed: str) -> frozenset[int]:
    """The CPUs of a Linux CPU list such as ``"0-3,8"``."""
    cpus: set[int] = set()
    for part in listed.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def _threads(count: int) -> str:
    return f"{count} thread{'s' if count != 1 else ''}"


@contextlib.contextmanager
def thread_settings(threads: int) -> Iterator[None]:
    """Run PyTorch and TVM with ``threads`` threads (TVM reads ``TVM_NUM_THREADS``, and
    processes started inside, such as MetaSchedule's runners, inherit it)."""
    import torch

    previous_torch = torch.get_num_threads()
    previous_env = os.environ.get("TVM_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_torch)
        if previous_env is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = previous_env
