"""Run a module compiled for an NVIDIA GPU with the TVM runtime alone.

:mod:`fgq_tvm.runtime` calls this for a module whose sidecar's target is ``cuda``: it loads
``libtvm_runtime_cuda.so`` (beside ``libtvm_runtime.so``; it needs the NVIDIA driver's
``libcuda.so.1`` and the CUDA runtime ``libcudart.so.13``), makes the module's compiled GPU
code load without a compiler (:func:`~fgq_tvm.cuda_binary.register_fatbin_loader`), checks that
this machine has a GPU of the module's architecture or a newer one, and copies tensors between
the CPU and the GPU. Like the rest of the runtime it imports neither ``tvm`` nor PyTorch.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cuda_binary import register_fatbin_loader
from .errors import FGQError

CUDA_RUNTIME_LIBRARY = "libtvm_runtime_cuda.so"
CUDA_DEVICE_TYPE = 2  # DLPack's kDLCUDA
COMPUTE_VERSION = 4  # TVM's DeviceAttrKind::kComputeVersion ("9.0")
DEVICE_NAME = 5  # DeviceAttrKind::kDeviceName
# The options of TVM's cuda target (TargetKind.options_from_name("cuda") of TVM 0.27, which a
# test compares): what a sidecar's cuda target may hold.
CUDA_TARGET_OPTIONS = {
    "kind": "str", "keys": "Array<str>", "tag": "str", "device": "str", "model": "str",
    "libs": "Array<str>", "host": "target.Target", "from_device": "int",
    "target_device_type": "int", "mcpu": "str", "arch": "str", "max_shared_memory_per_block":
    "int", "max_threads_per_block": "int", "thread_warp_size": "int", "registers_per_block":
    "int", "l2_cache_size_bytes": "int", "max_num_threads": "int",
}  # fmt: skip


@dataclass(frozen=True)
class Gpu:
    """The GPU a module runs on: its index and what the driver says of it."""

    index: int
    name: str
    compute_version: str

    @property
    def description(self) -> str:
        """``GPU 0: NVIDIA H200 (compute capability 9.0)``."""
        return f"GPU {self.index}: {self.name} (compute capability {self.compute_version})"

    @property
    def device(self) -> tuple[int, int]:
        """DLPack's device type and index."""
        return CUDA_DEVICE_TYPE, self.index


def open_gpu(path: Path, arch: str, runtime_library: Path, tvm_ffi) -> Gpu:
    """Make the CUDA runtime serve ``path`` (compiled for ``arch``, such as ``sm_90``) and
    return GPU 0.

    Raises
    ------
    FGQError
        No NVIDIA driver or CUDA runtime library, no GPU, or a GPU older than ``arch``.
    """
    _load_cuda_runtime(path, arch, runtime_library.parent / CUDA_RUNTIME_LIBRARY, tvm_ffi)
    register_fatbin_loader(tvm_ffi)
    if int(tvm_ffi.get_global_func("runtime.GetCudaDeviceCount")()) < 1:
        raise FGQError(f"{path} runs on an NVIDIA GPU ({arch}) and this machine has none")
    attribute = tvm_ffi.get_global_func("runtime.GetDeviceAttr")
    gpu = Gpu(
        0,
        str(attribute(CUDA_DEVICE_TYPE, 0, DEVICE_NAME)),
        str(attribute(CUDA_DEVICE_TYPE, 0, COMPUTE_VERSION)),
    )
    if _capability(gpu.compute_version) < int(arch.removeprefix("sm_").rstrip("af")):
        raise FGQError(
            f"{path} was compiled for {arch}, newer than this GPU ({gpu.name}, compute "
            f"capability {gpu.compute_version}); recompile it with --target cuda "
            f"-arch=sm_{gpu.compute_version.replace('.', '')}"
        )
    return gpu


def _load_cuda_runtime(path: Path, arch: str, library: Path, tvm_ffi) -> None:
    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    if not library.is_file():
        raise FGQError(
            f"{path} runs on an NVIDIA GPU and {library} is missing: install apache-tvm (its "
            "wheel has it), or bundle the module with fgq-tvm bundle"
        )
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        missing = str(error).split(":")[0]
        raise FGQError(
            f"{path} runs on an NVIDIA GPU ({arch}) and this machine cannot load the CUDA "
            f"runtime ({missing} is missing: no NVIDIA driver or CUDA runtime here); run it on a "
            "machine with an NVIDIA GPU, or compile the model for this CPU (--target llvm)"
        ) from None


def _capability(version: str) -> int:
    """``"9.0"`` as 90."""
    major, _, minor = version.partition(".")
    return int(major) * 10 + int(minor or 0)


def to_gpu(tensor, gpu: Gpu, tvm_ffi):
    """A copy of the CPU ``tvm_ffi`` tensor ``tensor`` on ``gpu``."""
    copy = _empty(tensor.shape, tensor.dtype, tvm_ffi.device("cuda", gpu.index), tvm_ffi)
    tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")(tensor, copy)
    return copy


def to_numpy(tensor, tvm_ffi) -> np.ndarray:
    """A NumPy copy of the GPU ``tvm_ffi`` tensor ``tensor``."""
    host = _empty(tensor.shape, tensor.dtype, tvm_ffi.device("cpu", 0), tvm_ffi)
    tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")(tensor, host)
    return np.from_dlpack(host).copy()


def _empty(shape, dtype, device, tvm_ffi):
    allocate = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
    return allocate(tvm_ffi.Shape(list(shape)), dtype, device, None)
