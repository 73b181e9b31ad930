"""What fgq-tvm knows of CPUs: the host's (``/proc/cpuinfo``), a target's (LLVM), and the int8
peak of a core.

* The host: :func:`read_cpuinfo`, its clock (:func:`cpu_ghz`), name (:func:`cpu_name`) and
  flags (:func:`host_flags`, :func:`host_has`).
* A target: :func:`target_has` asks the LLVM inside TVM whether code built for a
  :class:`tvm.target.Target` may use an instruction set extension (LLVM's names, such as
  ``"avx512vnni"`` or ``"amx-int8"``); :func:`missing_extensions` lists those of
  :data:`X86_EXTENSIONS` that a host lacks, so that a module built for another CPU is refused
  before it dies of an illegal instruction.
* The peak: :func:`vnni_macs_per_cycle` and :func:`vnni_peak_gmacs`.

TVM is imported only inside the functions that ask LLVM about a target: a deployed runtime may
lack the compiler, and reading the host's flags needs none of it.
"""

from __future__ import annotations

import contextlib
import os
import platform
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
        False for a ``target`` of None, and where TVM has no LLVM to ask (a runtime-only
        installation).
    """
    if target is None:
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.llvm_cpu_has_features(list(features), target))
    except AttributeError:  # a TVM without LLVM
        return False


def is_llvm_cpu_target(target: Target | None) -> bool:
    """Whether ``target`` (a :class:`tvm.target.Target` or None) is an LLVM target with an
    ``-mcpu``.

    Parameters
    ----------
    target
        The target, or None.

    Returns
    -------
    bool
    """
    return target is not None and str(target.kind.name) == "llvm" and bool(target.attrs.get("mcpu"))


def llvm_knows_cpu(target: Target) -> bool:
    """Whether the LLVM inside TVM knows the ``-mcpu`` of ``target`` for its triple.

    Parameters
    ----------
    target
        An LLVM :class:`tvm.target.Target` with an ``-mcpu`` (:func:`is_llvm_cpu_target`).

    Returns
    -------
    bool
        True for a TVM without LLVM: there is nothing to check against.
    """
    from tvm.target import Target, codegen

    triple = target.attrs.get("mtriple")
    base = Target({"kind": "llvm", **({"mtriple": str(triple)} if triple else {})})
    try:
        return str(target.attrs["mcpu"]) in {
            str(cpu) for cpu in codegen.llvm_get_cpu_archlist(base)
        }
    except AttributeError:
        return True


def missing_extensions(target: Target | None, flags: set[str]) -> list[str]:
    """The x86 extensions of :data:`X86_EXTENSIONS` that code compiled for ``target`` may use
    and a CPU with ``flags`` lacks.

    Parameters
    ----------
    target
        A :class:`tvm.target.Target`, or None (TVM has no LLVM to parse it with).
    flags
        The CPU's ``/proc/cpuinfo`` flags (:func:`host_flags`).

    Returns
    -------
    list of str
        LLVM's names of the missing extensions. Empty when ``target`` is no LLVM target with
        an ``-mcpu`` or TVM has no LLVM to ask (a runtime-only installation): the check is then
        left to the loader.
    """
    if not is_llvm_cpu_target(target):
        return []
    return [
        name
        for name, flag in X86_EXTENSIONS.items()
        if flag not in flags and target_has(target, name)
    ]


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
