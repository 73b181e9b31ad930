"""GPU code compiled when a module is built, so that loading it needs no CUDA compiler.

TVM 0.27's CUDA codegen hands the CUDA source it generates to the module, and the module
compiles it when it is loaded, through the global function ``tvm_callback_cuda_compile``
(nvcc or NVRTC on the machine that loads it). fgq-tvm compiles the source with nvcc at build
time instead (:func:`compiled_cuda_source`, registered as TVM's ``tvm_callback_cuda_postproc``
while a module builds: :func:`compiling_cuda_with_nvcc`) and puts the fatbin, base64-encoded
after a marker line, where the source was. At load time :func:`register_fatbin_loader` makes
``tvm_callback_cuda_compile`` return that fatbin: no compiler runs.

nvcc runs without ``--use_fast_math`` and with ``-fmad=false``: the kernels compute the
reference's float32 and float64 operations one by one, and a fused multiply-add (or an
approximate division) would round differently. The fatbin holds the GPU code for the target's
architecture and its PTX, which newer GPUs compile in their driver.

Nothing here imports ``tvm``: the loader is part of the runtime (:mod:`fgq_tvm.runtime`).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import FGQError

MARKER = "// fgq-tvm: nvcc fatbin for {arch}, base64\n"
_MARKER_START = MARKER.split("{")[0]
NVCC_OPTIONS = ("-O3", "-fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false")
POSTPROC = "tvm_callback_cuda_postproc"
COMPILE = "tvm_callback_cuda_compile"


def nvcc_command(arch: str, source: Path, output: Path) -> list[str]:
    """The nvcc command line that compiles ``source`` into the fatbin ``output`` for ``arch``
    (such as ``sm_90``): its GPU code and its PTX."""
    number = arch.removeprefix("sm_")
    return [
        "nvcc", "--fatbin", *NVCC_OPTIONS,
        "-gencode", f"arch=compute_{number},code=sm_{number}",
        "-gencode", f"arch=compute_{number},code=compute_{number}",
        "-o", str(output), str(source),
    ]  # fmt: skip


def compiled_cuda_source(code: str, arch: str) -> str:
    """``code`` (CUDA source) compiled by nvcc for ``arch``: the marker line, then the fatbin
    in base64.

    Raises
    ------
    FGQError
        nvcc is not installed, or fails (its first error line is given).
    """
    if shutil.which("nvcc") is None:
        raise FGQError(
            "building for a cuda target needs nvcc (the CUDA toolkit) on PATH; the machine "
            "that runs the module needs only the NVIDIA driver"
        )
    with tempfile.TemporaryDirectory(prefix="fgq-tvm-nvcc-") as folder:
        source, output = Path(folder) / "kernels.cu", Path(folder) / "kernels.fatbin"
        source.write_text(code)
        result = subprocess.run(
            nvcc_command(arch, source, output), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            reason = (errors or result.stderr.strip().splitlines() or ["no message"])[0]
            raise FGQError(f"nvcc could not compile the generated CUDA code for {arch}: {reason}")
        binary = output.read_bytes()
    return MARKER.format(arch=arch) + base64.b64encode(binary).decode("ascii")


def embedded_fatbin(code: str) -> bytes | None:
    """The fatbin that :func:`compiled_cuda_source` put in ``code``, or ``None`` when ``code``
    is CUDA source."""
    if not code.startswith(_MARKER_START):
        return None
    return base64.b64decode(code.split("\n", 1)[1])


@contextlib.contextmanager
def compiling_cuda_with_nvcc(arch: str) -> Iterator[None]:
    """While the block runs, TVM's CUDA codegen compiles what it generates with nvcc for
    ``arch`` (:func:`compiled_cuda_source`); its postproc hook is restored afterwards."""
    import tvm_ffi

    previous = tvm_ffi.get_global_func(POSTPROC, allow_missing=True)

    def postproc(code: str, _target=None) -> str:
        return compiled_cuda_source(code, arch)

    tvm_ffi.register_global_func(POSTPROC, postproc, override=True)
    try:
        yield
    finally:
        if previous is None:
            tvm_ffi.remove_global_func(POSTPROC)
        else:
            tvm_ffi.register_global_func(POSTPROC, previous, override=True)


def register_fatbin_loader(tvm_ffi) -> None:
    """Make ``tvm_callback_cuda_compile`` return the fatbins of fgq-tvm modules (CUDA source
    of other modules goes to the function registered before, if any).

    Raises
    ------
    FGQError
        At load time, for a module that holds CUDA source and no compiler is registered.
    """
    global _loader_registered
    if _loader_registered:
        return
    previous = tvm_ffi.get_global_func(COMPILE, allow_missing=True)

    def load_fatbin(code: str) -> bytes:
        binary = embedded_fatbin(code)
        if binary is not None:
            return binary
        if previous is None:
            raise FGQError(
                "this module holds CUDA source, not compiled GPU code; rebuild it with fgq-tvm "
                "compile (which compiles it with nvcc)"
            )
        return previous(code)

    tvm_ffi.register_global_func(COMPILE, load_fatbin, override=True)
    _loader_registered = True


_loader_registered = False
