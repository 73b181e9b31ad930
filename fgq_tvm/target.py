"""Target strings as users type them, translated to what TVM 0.27 accepts.

TVM 0.27 rejects ``"llvm -mcpu=skylake"`` and wants ``{"kind": "llvm", "mcpu": "skylake"}``
(DESIGN.md). :func:`parse_target` takes the command-line form (separate words or one quoted
string) or a JSON dict, checks every option (a CPU's against the LLVM inside TVM, an NVIDIA
GPU's architecture against :data:`CUDA_ARCHITECTURES`), and returns a
:class:`tvm.target.Target`. A ``cuda`` target without ``-arch`` is for
:data:`DEFAULT_CUDA_ARCH` (H100 and H200); its host code is for any x86-64 CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from .errors import UsageError

TUNING_LOGS = Path("tuning_logs")  # tuning databases, one folder per target key

SUPPORTED_KINDS = ("llvm", "cuda")
LIST_OPTIONS = ("mattr",)
STRING_OPTIONS = ("mcpu", "mtriple", "mabi")
CUDA_OPTIONS = ("arch",)
TARGET_FLAG = re.compile(r"^-(mcpu|mattr|mtriple|mabi|arch)(=.*)?$")
# The GPU architectures nvcc 13 compiles for (sm_75 and newer: int8 tensor cores on all of them)
CUDA_ARCHITECTURES = (
    "sm_75", "sm_80", "sm_86", "sm_87", "sm_88", "sm_89", "sm_90", "sm_100", "sm_103", "sm_110",
    "sm_120", "sm_121",
)  # fmt: skip
DEFAULT_CUDA_ARCH = "sm_90"
CUDA_LIMITS = {"max_shared_memory_per_block": 49152}  # bytes a block may use without opting in


def is_target_flag(word: str) -> bool:
    """True for a word such as ``-mcpu=skylake`` that belongs to a target string."""
    return bool(TARGET_FLAG.match(word))


def parse_target(text: str | list[str]):
    """Parse a target given as words, one string, or a JSON dict.

    Parameters
    ----------
    text
        ``["llvm", "-mcpu=skylake"]``, ``"llvm -mcpu=skylake -mattr=+avx2,+fma"``,
        ``'{"kind": "llvm", "mcpu": "skylake"}'``, ``"cuda -arch=sm_90"`` or
        ``'{"kind": "cuda", "arch": "sm_90"}'``.

    Returns
    -------
    tvm.target.Target

    Raises
    ------
    UsageError
        If the target is malformed, neither a CPU (llvm) nor an NVIDIA GPU (cuda) target,
        names a CPU, triple or feature that LLVM does not know, or a GPU architecture not in
        :data:`CUDA_ARCHITECTURES`.
    """
    words = text if isinstance(text, list) else [text]
    joined = " ".join(words).strip()
    config = _parse_json(joined) if joined.startswith("{") else _parse_words(joined.split())
    import tvm

    try:
        _validate(config)
        if config["kind"] == "cuda":
            gpu = {"arch": DEFAULT_CUDA_ARCH, **CUDA_LIMITS, **config}
            return tvm.target.Target(gpu, host={"kind": "llvm"})
        return tvm.target.Target(config)
    except ValueError as error:  # TVM's checks of the options' names and types
        reason = str(error).split(" Target creation from config dict failed")[0]
        raise UsageError(f"target {joined} is not valid: {reason}") from None


def host_target() -> str:
    """``llvm -mcpu=<host CPU>``, or plain ``llvm`` when LLVM does not know the host CPU.

    Modules built for another CPU may use instructions this one lacks (``-mcpu=znver4`` code
    can contain AMD-only SSE4a instructions, fatal on an Intel host): run tests on this one.
    """
    from tvm.target import Target, codegen

    cpu = str(codegen.llvm_get_system_cpu())
    known = {str(name) for name in codegen.llvm_get_cpu_archlist(Target({"kind": "llvm"}))}
    return f"llvm -mcpu={cpu}" if cpu in known else "llvm"


def target_key(target) -> str:
    """A short folder-safe name for a target, such as ``llvm-znver4`` or ``cuda-sm_90``."""
    parts = [str(target.kind.name)]
    model = target.attrs.get("mcpu") or target.attrs.get("arch")
    if model:
        parts.append(str(model))
    return "-".join(parts)


def database_folder(target, tuning_logs: str | os.PathLike = TUNING_LOGS) -> Path:
    """``tuning_logs/<target key>``: where the MetaSchedule database of ``target`` lives."""
    return Path(tuning_logs) / target_key(target)


def _parse_json(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"target JSON is malformed ({error.msg}): e.g. " + _EXAMPLE) from None
    if not isinstance(config, dict) or "kind" not in config:
        raise UsageError('target JSON must be an object with a "kind": e.g. ' + _EXAMPLE)
    return config


def _parse_words(words: list[str]) -> dict:
    if not words:
        raise UsageError("target is empty: e.g. --target llvm -mcpu=skylake")
    kind, *options = words
    config: dict = {"kind": kind}
    for option in options:
        key, sep, value = option.lstrip("-").partition("=")
        if not option.startswith("-") or not sep or not value:
            raise UsageError(
                f"target option {option!r} is malformed: write -KEY=VALUE, e.g. -mcpu=skylake"
            )
        names = CUDA_OPTIONS if kind == "cuda" else (*STRING_OPTIONS, *LIST_OPTIONS)
        if key not in names:
            known = ", ".join(f"-{name}" for name in names)
            raise UsageError(f"target option -{key} is not supported for {kind}: use {known}")
        config[key] = value.split(",") if key in LIST_OPTIONS else value
    return config


def _validate(config: dict) -> None:
    kind = config["kind"]
    if kind not in SUPPORTED_KINDS:
        raise UsageError(
            f"target kind {kind!r} is not supported: fgq-tvm compiles for CPUs ('llvm') and "
            "NVIDIA GPUs ('cuda')"
        )
    if kind == "cuda":
        _validate_cuda(config)
        return
    from tvm.target import Target, codegen

    triple = config.get("mtriple")
    if triple is not None:
        arch = str(triple).split("-")[0]
        if arch not in set(codegen.llvm_get_targets()):
            raise UsageError(f"target triple {triple!r} names an architecture LLVM does not know")
    base = {key: value for key, value in config.items() if key in ("kind", "mtriple")}
    mcpu = config.get("mcpu")
    if mcpu is not None and str(mcpu) not in set(codegen.llvm_get_cpu_archlist(Target(base))):
        raise UsageError(
            f"CPU {mcpu!r} is unknown to LLVM: use e.g. -mcpu=skylake, -mcpu=znver4 or "
            "-mcpu=cascadelake"
        )
    for feature in config.get("mattr", []):
        name = str(feature)
        if name[:1] not in "+-" or not _is_llvm_feature(base, name[1:]):
            raise UsageError(
                f"target feature {name!r} is not a valid -mattr entry: write +FEATURE or "
                "-FEATURE with a feature LLVM knows, e.g. -mattr=+avx2,+fma"
            )


def _validate_cuda(config: dict) -> None:
    unknown = sorted(set(config) - {"kind", *CUDA_OPTIONS})
    if unknown:
        raise UsageError(f"target option {unknown[0]!r} is not supported for cuda: use 'arch'")
    arch = config.get("arch", DEFAULT_CUDA_ARCH)
    if arch not in CUDA_ARCHITECTURES:
        raise UsageError(
            f"GPU architecture {arch!r} is not one nvcc 13 compiles for: use one of "
            f"{', '.join(CUDA_ARCHITECTURES)} (default {DEFAULT_CUDA_ARCH}: H100 and H200; "
            "nvidia-smi --query-gpu=compute_cap gives yours, 9.0 meaning sm_90)"
        )


def _is_llvm_feature(base: dict, name: str) -> bool:
    """True if LLVM enables ``name`` when asked to (it ignores unknown names, with a warning)."""
    from tvm.target import Target, codegen

    with _quiet_stderr():
        enabled = codegen.llvm_get_cpu_features(Target({**base, "mattr": ["+" + name]}))
    return name in {str(feature) for feature in enabled}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence LLVM's own warnings (written to file descriptor 2) while probing."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_EXAMPLE = '{"kind": "llvm", "mcpu": "skylake"}'
