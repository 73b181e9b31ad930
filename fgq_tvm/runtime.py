"""Run compiled fgq-tvm modules with only NumPy, apache-tvm-ffi and ``libtvm_runtime.so``.

:func:`load` opens a ``.so`` written by ``fgq-tvm compile`` together with its sidecar JSON
(``model.so.json``, see :func:`sidecar_path`) and returns a :class:`CompiledModel` that maps a
float32 NCHW batch to its logits. Nothing here imports the ``tvm`` package or PyTorch
(``tvm_ffi`` imports PyTorch opportunistically when it is installed; it is not needed): the
module runs in TVM's Relax virtual machine of ``libtvm_runtime.so``
(:func:`runtime_library`), called through ``tvm_ffi``, and the check that this CPU can run its
code reads tables of LLVM's CPUs, not LLVM (:func:`~fgq_tvm.cpu_features.compiled_extensions`).
This module and those it imports are what ``fgq-tvm bundle`` ships (:mod:`fgq_tvm.bundle`).
A module compiled for an NVIDIA GPU (a ``cuda`` target) runs on GPU 0 through the CUDA runtime
of the same TVM (:mod:`fgq_tvm.gpu_runtime`); inputs and logits are NumPy arrays all the same.

The module's ``prepare`` function (weights packed for the kernels) runs once, at load time; its
result is passed to every call of ``main``. A module is compiled for one batch size,
``info["input"]["shape"][0]``. A :class:`CompiledModel` takes any batch whose size is a multiple
of it and runs it in slices of that size.

The sidecar records the SHA-256 of its module (:func:`module_digest`), and :func:`load` checks
it before the library is opened: a module and a sidecar that two compiles wrote over each other
are refused instead of run with the wrong description.

A module runs with the threads :func:`~fgq_tvm.threads.choose_threads` picks: ``load``'s
``threads``, else ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``), else one per CPU core this
process may use, not TVM's default of half the logical CPUs (:func:`_use_threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import struct
import threading
import time
from itertools import zip_longest
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import cpu_features, gpu_runtime
from .errors import FGQError
from .gpu_runtime import CUDA_DEVICE_TYPE, Gpu
from .threads import choose_threads, cores, usable_cpus

SIDECAR_FORMAT = "fgq-tvm-module/3"
RUNTIME_LIBRARY = "libtvm_runtime.so"
LIBRARY_PATH_VARIABLE = "TVM_LIBRARY_PATH"  # TVM's own: a folder searched first
_FORMAT_NAME = SIDECAR_FORMAT.split("/")[0]
_DIGEST = re.compile("[0-9a-f]{64}")  # a SHA-256 in hexadecimal
_CHUNK = 1 << 20
INPUT_DTYPE = np.dtype("float32")
_ALIGNMENT = 64  # bytes: TVM's allocations, which compiled kernels may assume of their inputs
_CPU = (1, 0)  # DLPack device type and index of the CPU
_POOLED_ALLOCATOR = 2  # the Relax VM's memory allocator kind, as tvm.relax.VirtualMachine picks
_ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1
# ELF class (32 or 64 bit) -> format and offset of e_phoff/e_shoff, offset of e_phentsize,
# format of a program header and the positions of p_type, p_offset, p_filesz in it.
_ELF_CLASSES = {
    1: ("II", 28, 42, "8I", (0, 1, 4)),
    2: ("QQ", 32, 54, "2I6Q", (0, 2, 5)),
}


def sidecar_path(module_path: str | os.PathLike) -> Path:
    """The JSON that describes ``model.so``: ``model.so.json`` beside it."""
    return Path(str(module_path) + ".json")


class CompiledModel:
    """A loaded fgq-tvm module: call it with a float32 NCHW batch to get the logits.

    Attributes
    ----------
    path
        The ``.so`` file.
    info
        The sidecar dict (model, target, input contract, quantization per layer).
    input_shape
        The NCHW input shape the module was compiled for (its batch is the slice size).
    input_dtype
        Always ``float32``.
    threads
        How many threads it runs with (TVM's thread pool of each thread that calls it).
    threads_reason
        Why, in a line such as ``"2 threads: one per CPU core this process may use; set
        TVM_NUM_THREADS to change"``.
    gpu
        The GPU it runs on, or ``None`` for a module compiled for a CPU.
    """

    def __init__(
        self,
        path: Path,
        info: dict,
        vm,
        prepared,
        threads: int = 1,
        threads_reason: str = "",
        gpu: Gpu | None = None,
    ) -> None:
        self.path = path
        self.info = info
        self.input_shape: tuple[int, ...] = tuple(info["input"]["shape"])
        self.input_dtype = INPUT_DTYPE
        self.threads = threads
        self.threads_reason = threads_reason
        self.gpu = gpu
        self._vm = vm
        self._prepared = prepared

    def __call__(self, x, check_finite: bool = True) -> np.ndarray:
        """Run the network on ``x``.

        Parameters
        ----------
        x
            float32 array of shape ``[k * B, C, H, W]``, where ``[B, C, H, W]`` is
            :attr:`input_shape` and ``k >= 1``, normalised as ``info["input"]`` says: a NumPy
            array, or a C-contiguous tensor already on the module's device that supports
            DLPack (such as a PyTorch CUDA tensor for a module compiled for ``cuda``), which
            the module reads in place. Other dtypes (float64 included) are rejected rather
            than converted.
        check_finite
            Refuse a NumPy ``x`` if it holds NaN or infinite values (the quantized network
            would turn them into a confident class, NaN as if it were +inf). ``False`` skips
            the check; tensors on a device are not checked.
            Finite values of any size are accepted: activation quantization clamps them.

        Returns
        -------
        np.ndarray
            float32 logits ``[k * B, num_classes]``.

        Raises
        ------
        FGQError
            Wrong shape, dtype, device or layout, non-finite values, or the module fails to
            run.
        """
        self._check_input(*_description(x))
        if check_finite and isinstance(x, np.ndarray):
            _check_finite(x)
        batch = self.input_shape[0]
        _use_threads(self.threads)
        prepared = self._prepared
        try:
            outputs = [
                self._logits(self._vm["main"](self._input(x[start : start + batch]), prepared))
                for start in range(0, len(x), batch)
            ]
        except Exception as error:  # any failure inside the foreign code is reported alike
            raise FGQError(
                f"module {self.path} failed to run ({_first_line(error)}); recompile it"
            ) from error
        return np.concatenate(outputs)

    def operator_times(self, x, repeats: int = 10) -> dict[str, list[float]]:
        """Wall time of every operator call of one inference, by the called function's name.

        Runs the network ``repeats`` times on ``x`` (one batch, as :meth:`__call__` takes it)
        with the virtual machine's instrumentation, after one untimed run. On a GPU the
        device is synchronised before and after each call, so that a call's time is its
        kernels' (launches are asynchronous); the inference is slower than unprofiled by the
        synchronisations.

        Returns
        -------
        dict
            ``function name -> [seconds per inference]``, one entry per repeat (the sum over
            the function's calls in that inference), in order of first call. Kernels are
            named ``fgq_<layer>...``.
        """
        self._check_input(*_description(x))
        if len(x) != self.input_shape[0]:
            raise FGQError(f"profile one batch of {self.input_shape[0]}, not {len(x)} images")
        started: dict[str, float] = {}
        runs: list[dict[str, float]] = []
        synchronize = self._synchronizer()

        def instrument(_func, name, before_run, _ret, *_args):
            synchronize()
            if before_run:
                started[name] = time.perf_counter()
            elif runs:
                elapsed = time.perf_counter() - started.pop(name)
                runs[-1][name] = runs[-1].get(name, 0.0) + elapsed

        image = self._input(x)
        _use_threads(self.threads)
        self._vm["main"](image, self._prepared)
        self._vm["set_instrument"](instrument)
        try:
            for _ in range(repeats):
                runs.append({})
                self._vm["main"](image, self._prepared)
        finally:
            self._vm["set_instrument"](lambda *_args: None)
        return {name: [run.get(name, 0.0) for run in runs] for name in runs[0]}

    def _synchronizer(self):
        """A function that waits for the module's GPU to finish its work (nothing on a CPU)."""
        if self.gpu is None:
            return lambda: None
        tvm_ffi = tvm_ffi_runtime()
        device = tvm_ffi.device("cuda", self.gpu.index)
        sync = tvm_ffi.get_global_func("runtime.Device_StreamSync")
        return lambda: sync(device, 0)  # 0: the default stream, which the kernels run on

    def _input(self, x):
        """``x`` as a tensor on the module's device: a copy of a NumPy array, a device
        tensor as it is."""
        if not isinstance(x, np.ndarray):
            return _device_tensor(x)
        tensor = _tensor(x)
        return (
            tensor if self.gpu is None else gpu_runtime.to_gpu(tensor, self.gpu, tvm_ffi_runtime())
        )

    def _logits(self, result) -> np.ndarray:
        """The logits of ``main``'s result as a NumPy array."""
        if self.gpu is None:
            return _to_numpy(result[0])
        return gpu_runtime.to_numpy(result[0], tvm_ffi_runtime())

    def _check_input(self, shape: tuple[int, ...], dtype, device: tuple[int, int] | None):
        """Refuse an input of the wrong dtype, shape or (``(DLPack device type, index)``;
        ``None`` for a NumPy array) device."""
        if np.dtype(dtype) != INPUT_DTYPE:
            raise FGQError(
                f"expected float32 input, got {np.dtype(dtype)}; convert it (NumPy: "
                "x.astype(np.float32))"
            )
        batch, *sample = self.input_shape
        if (
            len(shape) != len(self.input_shape)
            or list(shape[1:]) != sample
            or not _fits(shape[0], batch)
        ):
            multiple = f" with N a multiple of {batch}" if batch > 1 else ""
            raise FGQError(
                f"expected input of shape [N, {', '.join(map(str, sample))}]{multiple}, "
                f"got {list(shape)}"
            )
        expected = _CPU if self.gpu is None else self.gpu.device
        if device is not None and device != expected:
            raise FGQError(
                f"the input tensor is on {_device_name(device)}, and this module runs on "
                f"{_device_name(expected)}; move it there, or pass a NumPy array"
            )


def _fits(rows: int, batch: int) -> bool:
    return rows > 0 and rows % batch == 0


def _device_tensor(x):
    """The DLPack tensor ``x`` as a ``tvm_ffi`` tensor, without a copy."""
    import tvm_ffi

    if not hasattr(x, "__dlpack__"):
        raise FGQError(f"expected a NumPy array or a DLPack tensor, got {type(x).__name__}")
    try:
        return tvm_ffi.from_dlpack(x, require_alignment=_ALIGNMENT, require_contiguous=True)
    except Exception as error:  # from_dlpack's own errors: not contiguous, not aligned
        raise FGQError(
            f"the input tensor cannot be read in place ({_first_line(error)}); pass a "
            f"contiguous tensor aligned to {_ALIGNMENT} bytes, or a NumPy array"
        ) from None


def _description(x) -> tuple[tuple[int, ...], np.dtype, tuple[int, int] | None]:
    """Shape, dtype and ``(DLPack device type, index)`` of the input ``x`` (``None`` for a
    NumPy array)."""
    if isinstance(x, np.ndarray):
        return x.shape, x.dtype, None
    tensor = _device_tensor(x)
    device = (int(tensor.device.dlpack_device_type()), int(tensor.device.index))
    return tuple(tensor.shape), np.dtype(str(tensor.dtype)), device


def _device_name(device: tuple[int, int]) -> str:
    kind, index = device
    names = {_CPU[0]: "the CPU", CUDA_DEVICE_TYPE: f"GPU {index}"}
    return names.get(kind, f"DLPack device {kind}:{index}")


def _tensor(x: np.ndarray):
    """A ``tvm_ffi`` tensor of a copy of ``x`` aligned as TVM aligns its own (the copy is C
    contiguous; the tensor keeps it alive)."""
    import tvm_ffi

    buffer = np.empty(x.nbytes + _ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % _ALIGNMENT
    aligned = buffer[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    aligned[...] = x
    return tvm_ffi.from_dlpack(aligned, require_alignment=_ALIGNMENT)


def _to_numpy(tensor) -> np.ndarray:
    """A NumPy copy of a ``tvm_ffi`` tensor (the virtual machine reuses its memory)."""
    return np.from_dlpack(tensor).copy()


def _check_finite(x: np.ndarray) -> None:
    """Refuse NaN and infinite inputs, saying how many there are and where the first is."""
    finite = np.isfinite(x)
    if finite.all():
        return
    count = finite.size - np.count_nonzero(finite)
    first = [int(i) for i in np.unravel_index(np.argmin(finite), x.shape)]
    raise FGQError(
        f"input has {count} non-finite value{'s' if count > 1 else ''} (NaN or infinity), the "
        f"first at {first}; fix the input, or skip this check with check_finite=False (fgq-tvm "
        "run --allow-nonfinite)"
    )


# TVM's affinity modes for runtime.config_threadpool (src/runtime/threading_backend.h).
_ONE_CPU_PER_THREAD = -2  # kSpecifyOneCorePerThread
_SHARE_CPUS = -3  # kSpecifyThreadShareAllCore
_pool = threading.local()  # .asked, .runs: the count set on this thread's TVM pool, and its own
# .forked: this thread forked the process it is in, and its TVM pool lost its threads


def _use_threads(count: int) -> int:
    """Make the calling thread's TVM thread pool run ``count`` threads; return how many it runs.

    TVM keeps one pool per calling thread. Left to itself, it makes it at the thread's first
    parallel loop, as large as ``TVM_NUM_THREADS`` (else ``OMP_NUM_THREADS``, else half the
    logical CPUs) says, and runs the loops on the calling thread alone where that is 1; the
    pool cannot grow later. ``runtime.config_threadpool`` with a list of CPUs makes the pool
    one thread per listed CPU where this thread has none yet, and runs ``count`` of its threads
    (at most its size) pinned one to a CPU (the first CPU of each core first, then their
    hyperthreads), or sharing all CPUs where ``count`` exceeds them. It also sets the calling
    thread's own affinity to the listed CPUs: that is put back.
    """
    if getattr(_pool, "asked", None) == count or getattr(_pool, "forked", False):
        return _pool.runs
    import tvm_ffi

    usable = usable_cpus()
    order = [cpu for core in zip_longest(*cores(usable)) for cpu in core if cpu is not None]
    mode = _ONE_CPU_PER_THREAD if count <= len(order) else _SHARE_CPUS
    listed = [str(order[i % len(order)]) for i in range(count)]
    tvm_ffi.get_global_func("runtime.config_threadpool")(mode, count, listed)
    with contextlib.suppress(AttributeError, OSError):  # no affinity outside Linux
        os.sched_setaffinity(0, usable)
    _pool.asked, _pool.runs = count, int(tvm_ffi.get_global_func("runtime.NumThreads")())
    return _pool.runs


def _after_fork_in_child() -> None:
    """Run the loops of the thread that forked serially in the child process.

    A fork copies only the calling thread, so the child's copy of that thread's TVM pool
    points at threads that do not exist, and its first parallel loop would wait for them for
    ever. One thread (``runtime.config_threadpool`` with one CPU: TVM then runs each loop on
    the calling thread) avoids them; affinities are not set (``TVM_BIND_THREADS=0``), since
    the lost threads' ids may name the parent's. Threads the child starts get pools of their
    own.
    """
    if getattr(_pool, "runs", 1) == 1:
        return
    import tvm_ffi

    bind = os.environ.get("TVM_BIND_THREADS")
    os.environ["TVM_BIND_THREADS"] = "0"
    try:
        tvm_ffi.get_global_func("runtime.config_threadpool")(_SHARE_CPUS, 1, ["0"])
    finally:
        if bind is None:
            del os.environ["TVM_BIND_THREADS"]
        else:
            os.environ["TVM_BIND_THREADS"] = bind
    _pool.runs, _pool.forked = 1, True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def load(
    path: str | os.PathLike, threads: int | None = None, device: str | None = None
) -> CompiledModel:
    """Load a module written by ``fgq-tvm compile``.

    Parameters
    ----------
    path
        The ``.so`` file; its sidecar ``<path>.json`` must be beside it.
    threads
        How many threads to run it with. Default: ``TVM_NUM_THREADS`` (else
        ``OMP_NUM_THREADS``) where set, else one per CPU core this process may use
        (:func:`~fgq_tvm.threads.choose_threads`). The model's :attr:`~CompiledModel.threads`
        and :attr:`~CompiledModel.threads_reason` say what it runs with and why.
    device
        ``"cpu"`` or ``"cuda"`` (GPU 0): where to run it. Default: where its target runs; a
        module runs on its target's device only.

    Returns
    -------
    CompiledModel

    Raises
    ------
    FGQError
        The module or its sidecar is missing, the sidecar is not in the fgq-tvm format of this
        version or describes another module (its ``module_sha256`` differs: two compiles wrote
        the pair), the file is not a loadable shared library (truncated, foreign, built for
        another machine), or it was compiled for a CPU with instructions this one lacks
        (:func:`~fgq_tvm.cpu_features.missing_extensions`). All of it is checked
        before the library is opened. ``device`` is not the module's; for a GPU module, this
        machine has no NVIDIA driver or GPU, or a GPU older than the module's architecture
        (:func:`~fgq_tvm.gpu_runtime.open_gpu`).
        ``threads`` or ``TVM_NUM_THREADS`` is not a positive integer.
        apache-tvm-ffi is not installed, or ``libtvm_runtime.so`` cannot be found
        (:func:`runtime_library`).
    """
    count, reason = choose_threads(threads)
    path = Path(path)
    info = check_module(path)
    _check_cpu(path, info)
    gpu = _open_device(path, info, device)
    vm = _virtual_machine(path, gpu)
    runs = _use_threads(count)
    if runs < count:
        reason = (
            f"{runs} of the {count} threads asked ({reason.split(': ', 1)[1]}): TVM's thread pool "
            "of this thread was made smaller and cannot grow; load it in another thread"
        )
    return CompiledModel(path, info, vm, _prepare(path, vm), runs, reason, gpu)


def module_device(info: dict) -> str:
    """``"cuda"`` for a module compiled for an NVIDIA GPU, else ``"cpu"`` (``info``: its
    checked sidecar)."""
    return "cuda" if json.loads(info["target"])["kind"] == "cuda" else "cpu"


def _open_device(path: Path, info: dict, device: str | None) -> Gpu | None:
    """The GPU a ``cuda`` module runs on (``None`` for a CPU module), checked against the
    ``device`` asked for."""
    kind = module_device(info)
    if device is not None and device != kind:
        raise FGQError(
            f"{path} was compiled for {'an NVIDIA GPU' if kind == 'cuda' else 'a CPU'} and runs "
            f"on device {kind!r} only, not {device!r}; compile it for that device (--target)"
        )
    if kind == "cpu":
        return None
    arch = json.loads(info["target"])["arch"]
    return gpu_runtime.open_gpu(path, arch, runtime_library(), tvm_ffi_runtime())


def check_module(path: str | os.PathLike) -> dict:
    """Check a module and its sidecar without opening the library or looking at this CPU.

    Parameters
    ----------
    path
        The ``.so`` file; its sidecar ``<path>.json`` must be beside it.

    Returns
    -------
    dict
        The sidecar (:func:`read_sidecar`).

    Raises
    ------
    FGQError
        The module or its sidecar is missing, the sidecar is not in the fgq-tvm format of this
        version or describes another module, its target is not one this runtime can check
        (:func:`parse_compiled_target`), or the file is not a complete ELF shared library.
    """
    path = Path(path)
    if not path.is_file():
        raise FGQError(f"module {path} does not exist; compile one with 'fgq-tvm compile'")
    info = read_sidecar(path)
    _check_elf(path)
    if module_digest(path) != info["module_sha256"]:
        raise FGQError(
            f"module {path} does not match its sidecar (written by another compile?): compile "
            "it again"
        )
    try:
        parse_compiled_target(info["target"])
    except ValueError as error:
        raise FGQError(
            f"{sidecar_path(path)} is not an fgq-tvm sidecar (target {error}); recompile the model"
        ) from None
    return info


def read_sidecar(module_path: str | os.PathLike) -> dict:
    """Read and check the sidecar JSON of ``module_path``.

    Raises
    ------
    FGQError
        The sidecar is missing, not JSON, or not in the format this version writes (an older
        fgq-tvm's included).
    """
    sidecar = sidecar_path(module_path)
    if not sidecar.is_file():
        raise FGQError(
            f"{sidecar} is missing: {module_path} was not written by fgq-tvm compile or its "
            ".json was removed; recompile the model"
        )
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FGQError(
            f"cannot read {sidecar} ({_first_line(error)}); recompile the model"
        ) from None
    version = info.get("format") if isinstance(info, dict) else None
    if version != SIDECAR_FORMAT and str(version).startswith(f"{_FORMAT_NAME}/"):
        raise FGQError(
            f"{sidecar} was written by another version of fgq-tvm (format {version!r}, this one "
            f"reads {SIDECAR_FORMAT!r}); recompile the model"
        )
    problem = _sidecar_problem(info)
    if problem:
        raise FGQError(f"{sidecar} is not an fgq-tvm sidecar ({problem}); recompile the model")
    return info


def module_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of the file ``path`` in hexadecimal: what a sidecar's ``module_sha256``
    records of its module."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar_problem(info: object) -> str | None:
    """What is wrong with a parsed sidecar, or None."""
    if not isinstance(info, dict):
        return "not a JSON object"
    if info.get("format") != SIDECAR_FORMAT:
        return f"format {info.get('format')!r}, expected {SIDECAR_FORMAT!r}"
    entry = info.get("input")
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(dim, int) and dim > 0 for dim in shape)
    ):
        return "input.shape is not four positive integers"
    if entry.get("dtype") != INPUT_DTYPE.name:
        return f"input.dtype {entry.get('dtype')!r}, expected 'float32'"
    if not isinstance(info.get("target"), str):
        return "target is not a string"
    digest = info.get("module_sha256")
    if not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        return "module_sha256 is not a SHA-256 digest"
    return None


def _check_elf(path: Path) -> None:
    """Refuse files that are not complete ELF shared libraries.

    ``dlopen`` of a truncated library maps pages past the end of the file and the process dies
    with SIGBUS, so the headers are checked against the file size before TVM opens the file.
    """
    with path.open("rb") as handle:
        extents = _elf_extents(path, handle)
    if max(extents) > path.stat().st_size:
        raise _not_loadable(path, "the file is truncated")


def _elf_extents(path: Path, handle: BinaryIO) -> list[int]:
    """The file offsets where the ELF's header tables and its loadable segments end."""
    header = handle.read(64)
    if header[:4] != _ELF_MAGIC:
        raise _not_loadable(path, "not an ELF shared library")
    if len(header) < 64:
        raise _not_loadable(path, "the file is truncated")
    if header[4] not in _ELF_CLASSES:
        raise _not_loadable(path, "corrupt ELF header")
    tables_format, tables_at, sizes_at, segment_format, fields = _ELF_CLASSES[header[4]]
    order = "<" if header[5] == 1 else ">"
    ph_offset, sh_offset = struct.unpack_from(order + tables_format, header, tables_at)
    ph_size, ph_count, sh_size, sh_count = struct.unpack_from(order + "HHHH", header, sizes_at)
    segment = struct.Struct(order + segment_format)
    if ph_size < segment.size:
        raise _not_loadable(path, "corrupt ELF header")
    handle.seek(ph_offset)
    table = handle.read(ph_size * ph_count)
    extents = [ph_offset + ph_size * ph_count, sh_offset + sh_size * sh_count]
    for start in range(0, len(table) - segment.size + 1, ph_size):
        kind, offset, file_size = (segment.unpack_from(table, start)[i] for i in fields)
        if kind == _PT_LOAD:
            extents.append(offset + file_size)
    return extents


# The options of TVM's llvm target and their types (TargetKind.options_from_name("llvm") of
# TVM 0.27, which a test compares): what a sidecar's target may hold.
LLVM_TARGET_OPTIONS = {
    "kind": "str", "keys": "Array<str>", "tag": "str", "device": "str", "model": "str",
    "libs": "Array<str>", "host": "target.Target", "from_device": "int",
    "target_device_type": "int", "mattr": "Array<str>", "mcpu": "str", "mtriple": "str",
    "mfloat-abi": "str", "mabi": "str", "num-cores": "int", "fast-math": "bool",
    "fast-math-nnan": "bool", "fast-math-ninf": "bool", "fast-math-nsz": "bool",
    "fast-math-arcp": "bool", "fast-math-contract": "bool", "fast-math-reassoc": "bool",
    "opt-level": "int", "cl-opt": "Array<str>", "jit": "str", "vector-width": "int",
}  # fmt: skip
_OPTION_TYPES = {
    "str": lambda value: isinstance(value, str),
    "int": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "bool": lambda value: isinstance(value, bool),
    "Array<str>": lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value),
    "target.Target": lambda value: isinstance(value, (dict, str)),
}


def parse_compiled_target(target: str) -> dict:
    """The config of the TVM target that a sidecar's ``target`` (a TVM target as JSON)
    describes, checked without TVM: an ``llvm`` target with TVM's options for it
    (:data:`LLVM_TARGET_OPTIONS`) and, for x86 code, a CPU that LLVM knows
    (:func:`~fgq_tvm.cpu_features.compiled_extensions`); or a ``cuda`` target with TVM's
    options for it (:data:`~fgq_tvm.gpu_runtime.CUDA_TARGET_OPTIONS`), its ``arch`` and such an
    ``llvm`` target as its ``host``.

    Parameters
    ----------
    target
        The sidecar's ``target``, such as ``'{"kind":"llvm","keys":["cpu"],"mcpu":"znver4"}'``.

    Returns
    -------
    dict
        The target's config.

    Raises
    ------
    ValueError
        ``target`` is not a JSON object, neither a CPU (``llvm``) nor a GPU (``cuda``) target,
        has an option TVM does not know or of the wrong type, or names an x86 CPU that LLVM
        does not know (its code could not be checked).
    """
    try:
        config = json.loads(target)
    except json.JSONDecodeError as error:
        raise ValueError(f"is not a JSON object ({error})") from None
    if not isinstance(config, dict):
        raise ValueError("is not a JSON object")
    if config.get("kind") == "cuda":
        _check_options(config, gpu_runtime.CUDA_TARGET_OPTIONS)
        if not isinstance(config.get("arch"), str) or not isinstance(config.get("host"), dict):
            raise ValueError("is a cuda target without its arch and host")
        _check_cpu_target(config["host"])
        return config
    _check_cpu_target(config)
    return config


def _check_cpu_target(config: dict) -> None:
    if config.get("kind") != "llvm":
        raise ValueError(
            f"is not for a CPU or an NVIDIA GPU (kind {config.get('kind')!r}, not 'llvm' or 'cuda')"
        )
    _check_options(config, LLVM_TARGET_OPTIONS)
    cpu_features.compiled_extensions(config)


def _check_options(config: dict, options: dict[str, str]) -> None:
    problem = _target_problem(config, options)
    if problem:
        raise ValueError(f"is not one TVM accepts ({problem})")


def _target_problem(config: dict, options: dict[str, str]) -> str | None:
    """What TVM would reject in a target config whose kind has ``options`` (in its words), or
    None."""
    for name, value in config.items():
        expected = options.get(name)
        if expected is None:
            return f"Unknown config option {name!r}"
        if not _OPTION_TYPES[expected](value):
            return f"Option {name!r}: expected type {expected!r} but got {type(value).__name__!r}"
    return None


def _check_cpu(path: Path, info: dict) -> None:
    """Refuse a module whose code this CPU cannot run: it would die of an illegal instruction,
    not raise an error (the target was checked by :func:`check_module`)."""
    flags = cpu_features.host_flags()  # None (no /proc/cpuinfo): nothing to check against
    config = parse_compiled_target(info["target"])
    config = config.get("host", config)  # a GPU module's CPU code
    missing = [] if flags is None else cpu_features.missing_extensions(config, flags)
    if missing:
        raise FGQError(
            f"{path} was compiled for another CPU ({info['target']}) and may use "
            f"{', '.join(missing)}, which this CPU lacks; recompile it here (fgq-tvm compile "
            "targets the host CPU by default)"
        )
    if _runs_amx(info):
        _request_tile_state(path)


def _runs_amx(info: dict) -> bool:
    """Whether a sidecar names a layer on a core of AMX tiles."""
    layers = info.get("layers")
    return isinstance(layers, list) and any(
        isinstance(layer, dict) and layer.get("core") in cpu_features.AMX_TILE_CORES
        for layer in layers
    )


def _request_tile_state(path: Path) -> None:
    """Ask Linux for AMX's tile state before the module's first AMX kernel runs: without it
    that kernel would die of SIGILL."""
    try:
        cpu_features.request_amx_tile_data()
    except OSError as error:
        raise FGQError(
            f"{path} runs AMX kernels and Linux refused this process AMX's tile state "
            f"({error.strerror}; Linux 5.16 or newer gives it); run it on such a kernel, or "
            "recompile it without AMX (--target with -mattr=-amx-tile)"
        ) from None


def runtime_library() -> Path:
    """Where ``libtvm_runtime.so`` is: in the folder ``TVM_LIBRARY_PATH`` names, else beside
    the ``fgq_tvm`` package (a folder written by ``fgq-tvm bundle``), else in the installed
    ``tvm`` package (found without importing it).

    Returns
    -------
    Path

    Raises
    ------
    FGQError
        None of them holds it.
    """
    folders = (
        [Path(os.environ[LIBRARY_PATH_VARIABLE])] if LIBRARY_PATH_VARIABLE in os.environ else []
    )
    folders.append(Path(__file__).resolve().parent.parent)
    folders += [Path(folder) / "lib" for folder in _tvm_package_folders()]
    for folder in folders:
        if (folder / RUNTIME_LIBRARY).is_file():
            return folder / RUNTIME_LIBRARY
    raise FGQError(
        f"cannot find {RUNTIME_LIBRARY}: install apache-tvm, set {LIBRARY_PATH_VARIABLE} to the "
        "folder that holds it, or run a folder written by fgq-tvm bundle"
    )


def _tvm_package_folders() -> list[str]:
    """The folders of the installed ``tvm`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("tvm")
    except (ImportError, ValueError):  # ValueError: a tvm module without a spec
        return []
    return list(spec.submodule_search_locations or []) if spec else []


def tvm_ffi_runtime():
    """The ``tvm_ffi`` module, with TVM's runtime library loaded once into the process."""
    try:
        import tvm_ffi
    except ImportError:
        raise FGQError("the TVM runtime needs apache-tvm-ffi: pip install apache-tvm-ffi") from None
    if tvm_ffi.get_global_func("runtime.config_threadpool", allow_missing=True) is None:
        # not loaded yet (by us, or by an import of tvm): its symbols serve the modules
        library = runtime_library()
        try:
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise FGQError(f"cannot load {library} ({_first_line(error)})") from None
    return tvm_ffi


def _virtual_machine(path: Path, gpu: Gpu | None = None):
    """Open the library with ``tvm_ffi`` and start its Relax virtual machine on the CPU, or on
    ``gpu`` with the CPU as its host."""
    tvm_ffi = tvm_ffi_runtime()
    devices = [*_CPU, _POOLED_ALLOCATOR]
    if gpu is not None:
        devices = [*gpu.device, _POOLED_ALLOCATOR, *devices]
    try:
        vm = tvm_ffi.load_module(str(path))["vm_load_executable"]()
        vm["vm_initialization"](*devices)
        return vm
    except Exception as error:  # TVM raises several unrelated types for foreign files
        raise _not_loadable(path, _first_line(error)) from error


def _prepare(path: Path, vm):
    """Run the module's ``prepare`` function (weights packed for its kernels)."""
    try:
        return vm["prepare"]()
    except Exception as error:  # see _virtual_machine
        raise _not_loadable(path, _first_line(error)) from error


def _not_loadable(path: Path, reason: str) -> FGQError:
    return FGQError(
        f"{path} is not a loadable fgq-tvm module ({reason}); recompile it with fgq-tvm compile"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
