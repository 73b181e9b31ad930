"""What fgq-tvm knows of CPUs: the host's (``/proc/cpuinfo``), a target's (LLVM), and the int8
peak of a core.

* The host: :func:`read_cpuinfo`, its clock (:func:`cpu_ghz`), name (:func:`cpu_name`) and
  flags (:func:`host_flags`, :func:`host_has`).
* A target: :func:`target_has` asks the LLVM inside TVM whether code built for a
  :class:`tvm.target.Target` may use an instruction set extension (LLVM's names, such as
  ``"avx512vnni"`` or ``"amx-int8"``).
* A sidecar's target (its JSON config), without the compiler: :func:`compiled_extensions`
  reads the extensions of :data:`X86_EXTENSIONS` its code may use from tables of what LLVM
  enables for each x86 CPU and ``-mattr`` feature (:mod:`fgq_tvm.x86_tables`, written from
  LLVM by :func:`write_x86_tables`); :func:`missing_extensions` lists those a host lacks, so
  that :func:`fgq_tvm.load` refuses a module built for another CPU before it dies of an
  illegal instruction, on a machine with the TVM runtime alone; :func:`request_amx_tile_data`
  asks Linux for AMX's tile state, which a module built for AMX needs before it runs.
* The peak: :func:`vnni_macs_per_cycle` and :func:`vnni_peak_gmacs`.

TVM is imported only inside the functions that ask LLVM about a target: a deployed runtime may
lack the compiler, and reading the host's flags needs none of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import io
import json
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm.target import Target

CPUINFO = "/proc/cpuinfo"

X86_EXTENSIONS = {
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "sse4a": "sse4a",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi2": "bmi2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512cd": "avx512cd",
    "avx512vnni": "avx512_vnni",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bitalg": "avx512_bitalg",
    "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni",
    "gfni": "gfni",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
}
"""LLVM's names of the x86 extensions compiled code may use, with their ``/proc/cpuinfo``
flags."""

VNNI_MACS_PER_CYCLE = 64
"""int8 multiply-accumulates per cycle per core assumed for the peak: one 512-bit vpdpbusd (64
MACs) per cycle, as on Zen 4 (two 256-bit halves) and Intel client cores."""
TWO_FMA_UNIT_CPUS = frozenset({
    "skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "sapphirerapids",
    "emeraldrapids", "graniterapids",
})  # fmt: skip
"""LLVM CPU names of Intel server cores that issue two 512-bit vpdpbusd per cycle (ports 0 and
5): 128 MACs per cycle per core."""


# --------------------------------------------------------------------------------------------
# The host
# --------------------------------------------------------------------------------------------


def read_cpuinfo(path: str | os.PathLike = CPUINFO) -> str:
    """The text of ``/proc/cpuinfo``, or ``""`` where there is none.

    Parameters
    ----------
    path
        The file to read (default: ``/proc/cpuinfo``).

    Returns
    -------
    str
    """
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_ghz(cpuinfo: str) -> float | None:
    """The highest ``cpu MHz`` in ``/proc/cpuinfo`` text, in GHz.

    Parameters
    ----------
    cpuinfo
        The text of ``/proc/cpuinfo`` (:func:`read_cpuinfo`).

    Returns
    -------
    float or None
        None where the text has no ``cpu MHz``.
    """
    values = []
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "cpu MHz":
            with contextlib.suppress(ValueError):
                values.append(float(value))
    return max(values) / 1000 if values else None


def cpu_name(cpuinfo: str) -> str:
    """The first ``model name`` in ``/proc/cpuinfo`` text, else the platform's processor.

    Parameters
    ----------
    cpuinfo
        The text of ``/proc/cpuinfo`` (:func:`read_cpuinfo`).

    Returns
    -------
    str
    """
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown CPU"


def host_flags() -> set[str] | None:
    """The CPU flags of ``/proc/cpuinfo`` (its first ``flags`` line).

    Returns
    -------
    set of str or None
        None where there is no ``/proc/cpuinfo`` to read, or it has no flags.
    """
    lines = [line for line in read_cpuinfo().splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else None


def host_has(*flags: str) -> bool:
    """Whether this CPU has every one of ``flags``.

    Parameters
    ----------
    *flags
        ``/proc/cpuinfo`` flags, such as ``"avx512_vnni"`` or ``"amx_int8"`` (the values of
        :data:`X86_EXTENSIONS`).

    Returns
    -------
    bool
        False where the host's flags cannot be read (:func:`host_flags` is None).
    """
    known = host_flags()
    return known is not None and set(flags) <= known


AMX_TILE_CORES = frozenset({"int8-amx"})
"""The cores whose kernels run AMX tile instructions (their names, as sidecars record them): a
module with a layer on one asks Linux for the tile state when it is loaded."""

# Linux x86-64: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) asks for AMX's tile data
ARCH_PRCTL_SYSCALL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def request_amx_tile_data() -> None:
    """Ask Linux for AMX's tile data state, for every thread of this process.

    Linux (5.16 and newer) gives a process the 8 KiB of tile registers only when asked, once;
    an AMX instruction before that dies of SIGILL. Asking again is harmless.

    Raises
    ------
    OSError
        Linux refused (``EOPNOTSUPP`` on a CPU without AMX, ``EINVAL`` from a kernel older
        than 5.16, which cannot give it), or this is not Linux on x86-64 (``ENOSYS``).
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        where = f"{sys.platform} on {platform.machine()}"
        raise OSError(errno.ENOSYS, f"AMX needs Linux on x86-64, not {where}")
    libc = ctypes.CDLL(None, use_errno=True)
    arguments = (ARCH_PRCTL_SYSCALL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    status = libc.syscall(*(ctypes.c_long(value) for value in arguments))  # variadic: longs
    if status != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"arch_prctl(ARCH_REQ_XCOMP_PERM): {os.strerror(code)}")


# --------------------------------------------------------------------------------------------
# A target, as the LLVM inside TVM sees it
# --------------------------------------------------------------------------------------------


def target_has(target: Target | None, *features: str) -> bool:
    """Whether code built for ``target`` may use every one of ``features``.

    Parameters
    ----------
    target
        An llvm :class:`tvm.target.Target` (its ``-mtriple``, ``-mcpu`` and ``-mattr``
        count), or None.
    *features
        LLVM feature names, such as ``"avx512vnni"`` or ``"amx-int8"`` (the keys of
        :data:`X86_EXTENSIONS`).

    Returns
    -------
    bool
        False for a ``target`` of None or of another kind than ``llvm`` (a GPU), and where TVM
        has no LLVM to ask (a runtime-only installation).
    """
    if target is None or str(target.kind.name) != "llvm":
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.llvm_cpu_has_features(list(features), target))
    except AttributeError:  # a TVM without LLVM
        return False


# --------------------------------------------------------------------------------------------
# A sidecar's target, without the compiler
# --------------------------------------------------------------------------------------------

X86_ARCHITECTURES = frozenset({"x86_64", "amd64", "x86", "i386", "i486", "i586", "i686"})
"""Architectures (the first word of a target triple, or :func:`platform.machine`) whose code
may use :data:`X86_EXTENSIONS`."""
X86_TRIPLE = "x86_64-unknown-linux-gnu"
"""The triple LLVM is asked about for :mod:`fgq_tvm.x86_tables`."""


def is_x86_target(config: Mapping) -> bool:
    """Whether a target config compiles x86 code.

    Parameters
    ----------
    config
        A TVM target as a dict, such as a sidecar's ``{"kind": "llvm", "mcpu": "znver4"}``.

    Returns
    -------
    bool
        Judged by the architecture of its ``mtriple``, else of this machine (TVM compiles for
        the host's triple where none is given).
    """
    triple = config.get("mtriple")
    arch = str(triple).split("-")[0] if triple else platform.machine()
    return arch.lower() in X86_ARCHITECTURES


def compiled_extensions(config: Mapping) -> list[str]:
    """The extensions of :data:`X86_EXTENSIONS` that code compiled for a target config may use,
    read from :mod:`fgq_tvm.x86_tables` (no compiler needed).

    Those of its ``mcpu`` (LLVM's ``generic`` CPU where it has none), then each ``mattr``
    entry in order, as LLVM applies them: ``+F`` adds ``F`` and what it implies, ``-F`` (or
    ``F`` without a sign) removes ``F`` and what implies it.

    Parameters
    ----------
    config
        A TVM ``llvm`` target as a dict, its ``mcpu`` a string and ``mattr`` a list of strings.

    Returns
    -------
    list of str
        LLVM's names of the extensions, in the order of :data:`X86_EXTENSIONS`; empty for a
        target that does not compile x86 code (:func:`is_x86_target`).

    Raises
    ------
    ValueError
        The target is x86 and LLVM does not know its ``mcpu``.
    """
    if not is_x86_target(config):
        return []
    from . import x86_tables

    mcpu = config.get("mcpu") or "generic"
    if mcpu not in _cpu_extensions():
        raise ValueError(f"names CPU {mcpu!r}, which LLVM does not know")
    used = set(_cpu_extensions()[mcpu])
    for entry in config.get("mattr", []):
        if entry.startswith("+"):
            used |= set(x86_tables.ENABLES.get(entry[1:], "").split())
        else:
            used -= set(x86_tables.DISABLES.get(entry.removeprefix("-"), "").split())
    return [name for name in X86_EXTENSIONS if name in used]


def missing_extensions(config: Mapping, flags: set[str]) -> list[str]:
    """The extensions that code compiled for a target config may use and a CPU with ``flags``
    lacks (:func:`compiled_extensions`; no compiler needed).

    Parameters
    ----------
    config
        A TVM ``llvm`` target as a dict (a sidecar's ``target``, parsed).
    flags
        The CPU's ``/proc/cpuinfo`` flags (:func:`host_flags`).

    Returns
    -------
    list of str
        LLVM's names of the missing extensions.

    Raises
    ------
    ValueError
        The target is x86 and LLVM does not know its ``mcpu``.
    """
    return [name for name in compiled_extensions(config) if X86_EXTENSIONS[name] not in flags]


@functools.cache
def _cpu_extensions() -> dict[str, list[str]]:
    """``CPU -> extensions`` of :data:`fgq_tvm.x86_tables.CPUS`."""
    from . import x86_tables

    return {
        cpu: extensions.split()
        for extensions, cpus in x86_tables.CPUS.items()
        for cpu in cpus.split()
    }


def llvm_x86_tables() -> dict[str, dict[str, str]]:
    """What the LLVM inside TVM enables of :data:`X86_EXTENSIONS` for each x86 CPU and ``-mattr``
    feature: the contents of :mod:`fgq_tvm.x86_tables`. Needs the compiler.

    Returns
    -------
    dict
        ``"CPUS"``: the extensions of a CPU (space-separated) -> the CPUs that have exactly
        those; ``"ENABLES"``: feature -> the extensions ``+feature`` enables; ``"DISABLES"``:
        feature -> the extensions ``-feature`` disables (those that imply it). Features with
        none are left out.
    """
    cpus: dict[str, list[str]] = {}
    for cpu in _llvm_x86_cpus():
        cpus.setdefault(" ".join(_llvm_enables(mcpu=cpu)), []).append(cpu)
    features = _llvm_x86_features()
    enables = {feature: " ".join(_llvm_enables(mattr=[f"+{feature}"])) for feature in features}
    disables = {
        feature: " ".join(
            name
            for name in X86_EXTENSIONS
            if name not in _llvm_enables(mattr=[f"+{name}", f"-{feature}"])
        )
        for feature in features
    }
    return {
        "CPUS": {extensions: " ".join(names) for extensions, names in cpus.items()},
        "ENABLES": {feature: names for feature, names in enables.items() if names},
        "DISABLES": {feature: names for feature, names in disables.items() if names},
    }


def write_x86_tables(path: str | os.PathLike | None = None) -> Path:
    """Write :func:`llvm_x86_tables` as the module :mod:`fgq_tvm.x86_tables` (after an upgrade
    of TVM, whose LLVM may know other CPUs). Needs the compiler.

    Parameters
    ----------
    path
        Where to write it (default: ``x86_tables.py`` beside this file).

    Returns
    -------
    Path
        The file written.
    """
    import tvm

    path = Path(path) if path is not None else Path(__file__).with_name("x86_tables.py")
    text = io.StringIO()
    text.write(_X86_TABLES_HEADER.format(version=tvm.__version__))
    for name, table in llvm_x86_tables().items():
        text.write(f"\n{name}: dict[str, str] = {{\n")
        entries = (f"    {json.dumps(key)}: {json.dumps(value)},\n" for key, value in table.items())
        text.writelines(entries)
        text.write("}\n")
    path.write_text(text.getvalue())
    return path


_X86_TABLES_HEADER = '''"""What the LLVM of TVM {version} enables of the x86 extensions that fgq-tvm
checks (:data:`fgq_tvm.cpu_features.X86_EXTENSIONS`), for checking modules without the compiler
(:func:`fgq_tvm.cpu_features.compiled_extensions`).

Written by :func:`fgq_tvm.cpu_features.write_x86_tables`; a test compares it with LLVM. ``CPUS``:
the extensions of a CPU (space-separated) -> the CPUs that have exactly those. ``ENABLES``:
feature -> what ``-mattr=+feature`` enables. ``DISABLES``: feature -> what ``-mattr=-feature``
disables (the extensions that imply it).
"""

# ruff: noqa: E501
'''


def _llvm_x86_target(**options: object):
    from tvm.target import Target

    return Target({"kind": "llvm", "mtriple": X86_TRIPLE, **options})


def _llvm_x86_cpus() -> list[str]:
    from tvm.target import codegen

    return sorted(str(cpu) for cpu in codegen.llvm_get_cpu_archlist(_llvm_x86_target()))


def _llvm_enables(**options: object) -> list[str]:
    """The extensions of :data:`X86_EXTENSIONS` LLVM enables for an x86 target with
    ``options``."""
    from tvm.target import codegen

    enabled = {str(name) for name in codegen.llvm_get_cpu_features(_llvm_x86_target(**options))}
    return [name for name in X86_EXTENSIONS if name in enabled]


def _llvm_x86_features() -> list[str]:
    """Every feature name LLVM's x86 target knows (it lists them for ``-mattr=+help``)."""
    from tvm.target import codegen

    with _captured_output() as output:
        codegen.llvm_get_cpu_features(_llvm_x86_target(mattr=["+help"]))
    listing = output.getvalue().split("Available features for this target:")[1]
    return sorted(line.split()[0] for line in listing.splitlines() if " - " in line)


@contextlib.contextmanager
def _captured_output():
    """What is written to file descriptors 1 and 2 meanwhile (LLVM writes there itself)."""
    import tempfile

    captured = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile("w+") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        sink.seek(0)
        captured.write(sink.read())


# --------------------------------------------------------------------------------------------
# The int8 peak
# --------------------------------------------------------------------------------------------


def vnni_macs_per_cycle(target: Target) -> int:
    """int8 MACs per cycle per core of the target's CPU (``-mcpu``).

    Parameters
    ----------
    target
        A :class:`tvm.target.Target`.

    Returns
    -------
    int
        128 for the Intel server cores of :data:`TWO_FMA_UNIT_CPUS`, else
        :data:`VNNI_MACS_PER_CYCLE`.
    """
    mcpu = str(target.attrs.get("mcpu", ""))
    return 2 * VNNI_MACS_PER_CYCLE if mcpu in TWO_FMA_UNIT_CPUS else VNNI_MACS_PER_CYCLE


def vnni_peak_gmacs(ghz: float, cores: int, macs_per_cycle: int = VNNI_MACS_PER_CYCLE) -> float:
    """int8 MAC peak in GMAC/s: ``macs_per_cycle`` x ``cores`` x ``ghz``.

    Parameters
    ----------
    ghz
        The clock, in GHz.
    cores
        Cores (threads) at work.
    macs_per_cycle
        int8 MACs per cycle per core (:func:`vnni_macs_per_cycle`).

    Returns
    -------
    float
    """
    return macs_per_cycle * cores * ghz
