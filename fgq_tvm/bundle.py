"""``fgq-tvm bundle``: a compiled module in a folder that runs where neither fgq-tvm nor the
apache-tvm package is installed, with only NumPy and apache-tvm-ffi.

The folder holds the module and its sidecar, TVM's ``libtvm_runtime.so`` (from the installed
apache-tvm), the runtime part of fgq-tvm (:data:`SHIPPED_MODULES`: the same files as here,
copied, which import nothing else of fgq-tvm), ``run.py`` (``fgq-tvm run`` for the module:
:func:`fgq_tvm.run_command.main`) and ``requirements.txt``::

    pip install -r DIR/requirements.txt
    python DIR/run.py --input X.npy [--output Y.npy]

or, from Python with ``DIR`` on ``sys.path``: ``import fgq_tvm; fgq_tvm.load(DIR / "m.so")(x)``.

A module compiled for an NVIDIA GPU also gets TVM's ``libtvm_runtime_cuda.so`` and the CUDA
runtime it links, ``libcudart.so.13`` (from the CUDA toolkit of this machine): the machine that
runs it needs only the NVIDIA driver.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import FGQError
from .gpu_runtime import CUDA_RUNTIME_LIBRARY
from .reporting import output_folder
from .runtime import RUNTIME_LIBRARY, check_module, module_device, runtime_library, sidecar_path

PACKAGE = Path(__file__).resolve().parent
SHIPPED_MODULES = (
    "__init__", "errors", "threads", "cpu_features", "x86_tables", "inputs", "reporting",
    "runtime", "gpu_runtime", "cuda_binary", "run_command",
)  # fmt: skip
"""The modules of fgq-tvm that a bundle ships in its ``fgq_tvm`` folder: :mod:`fgq_tvm.runtime`,
:mod:`fgq_tvm.run_command` and what they import."""
CUDA_RUNTIME = "libcudart.so.13"  # what libtvm_runtime_cuda.so links
RUN_SCRIPT = "run.py"
REQUIREMENTS = "requirements.txt"
NUMPY_REQUIREMENT = "numpy>=1.24"

_RUN_TEMPLATE = '''"""Run {name} (a module compiled by fgq-tvm) on a .npy batch, with only NumPy,
apache-tvm-ffi and the libtvm_runtime.so of this folder (written by fgq-tvm bundle):

    pip install -r requirements.txt
    python run.py --input X.npy [--output Y.npy] [--allow-nonfinite]

prints the top-1 classes and saves the logits, as fgq-tvm run does. From Python, with this
folder on sys.path: import fgq_tvm; logits = fgq_tvm.load(FOLDER / "{name}")(x).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fgq_tvm.run_command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], HERE / {name!r}))
'''


@dataclass(frozen=True)
class Bundle:
    """A folder written by :func:`write_bundle`.

    Attributes
    ----------
    folder
        The folder.
    files
        Its entries (the ``fgq_tvm`` package as ``fgq_tvm/``), in the order written.
    size
        The bytes of all its files.
    """

    folder: Path
    files: tuple[str, ...]
    size: int

    @property
    def size_mb(self) -> float:
        """:attr:`size` in megabytes (10^6 bytes)."""
        return self.size / 1e6


def write_bundle(module: str | os.PathLike, folder: str | os.PathLike) -> Bundle:
    """Write ``module``, its sidecar, TVM's runtime library, fgq-tvm's loader and ``run.py``
    into the new ``folder``.

    The folder is written under a temporary name beside it and renamed when complete: it is
    whole or absent.

    Parameters
    ----------
    module
        A ``.so`` written by ``fgq-tvm compile``, its sidecar beside it (checked as
        :func:`fgq_tvm.load` checks them, this CPU aside: the bundle may go to another).
    folder
        The folder to write: new (its parents are created), or empty.

    Returns
    -------
    Bundle

    Raises
    ------
    FGQError
        The module or its sidecar is not sound (:func:`~fgq_tvm.runtime.check_module`),
        ``folder`` exists and is not an empty folder, or cannot be written; TVM's runtime
        library is not installed (:func:`~fgq_tvm.runtime.runtime_library`).
    """
    module, folder = Path(module), Path(folder)
    info = check_module(module)
    if module.name in (RUNTIME_LIBRARY, CUDA_RUNTIME_LIBRARY, CUDA_RUNTIME):
        raise FGQError(f"a module named {module.name} would be a runtime library; rename it")
    libraries = runtime_libraries(gpu=module_device(info) == "cuda")
    _check_destination(folder)
    output_folder(folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        files = _fill(staging, module, libraries)
        size = sum(path.stat().st_size for path in staging.rglob("*") if path.is_file())
        staging.chmod(0o777 & ~_umask())
        staging.rename(folder)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise FGQError(f"cannot write {folder} ({error.strerror or error})") from None
        raise
    return Bundle(folder, files, size)


def _check_destination(folder: Path) -> None:
    """Refuse a ``folder`` that exists and is not an empty folder."""
    if folder.is_dir() and not any(folder.iterdir()):
        return
    if folder.is_dir():
        raise FGQError(f"{folder} is not empty: give a new folder, or remove this one first")
    if folder.exists() or folder.is_symlink():
        raise FGQError(f"{folder} exists and is not a folder: give a new folder name")


def _fill(staging: Path, module: Path, libraries: list[Path]) -> tuple[str, ...]:
    """Write the bundle's files into ``staging``; return their names."""
    sidecar = sidecar_path(module)
    for source in (module, sidecar, *libraries):
        shutil.copy2(source, staging / source.name)
    copy_loader(staging)
    (staging / RUN_SCRIPT).write_text(_RUN_TEMPLATE.format(name=module.name))
    (staging / REQUIREMENTS).write_text(f"{NUMPY_REQUIREMENT}\n{_tvm_ffi_requirement()}\n")
    names = (library.name for library in libraries)
    return (module.name, sidecar.name, *names, "fgq_tvm/", RUN_SCRIPT, REQUIREMENTS)


def runtime_libraries(gpu: bool) -> list[Path]:
    """The libraries a module needs beside the loader: ``libtvm_runtime.so``, and for a GPU
    module ``libtvm_runtime_cuda.so`` and ``libcudart.so.13``.

    Raises
    ------
    FGQError
        One of them is not installed here.
    """
    library = runtime_library()
    return [library, library.parent / CUDA_RUNTIME_LIBRARY, cuda_runtime()] if gpu else [library]


def copy_loader(folder: Path) -> None:
    """Copy fgq-tvm's runtime modules (:data:`SHIPPED_MODULES`) into ``folder / "fgq_tvm"``."""
    package = folder / "fgq_tvm"
    package.mkdir(exist_ok=True)
    for name in SHIPPED_MODULES:
        shutil.copyfile(PACKAGE / f"{name}.py", package / f"{name}.py")


def cuda_runtime() -> Path:
    """The ``libcudart.so.13`` that the dynamic loader finds here (as for
    ``libtvm_runtime_cuda.so``), read from this process's memory map once loaded.

    Raises
    ------
    FGQError
        The loader finds none: no CUDA 13 toolkit here.
    """
    try:
        ctypes.CDLL(CUDA_RUNTIME)
        maps = Path("/proc/self/maps").read_text().split()
    except OSError:
        maps = []
    for entry in maps:
        if Path(entry).name.startswith(CUDA_RUNTIME):
            return Path(entry)
    raise FGQError(
        f"bundling a GPU module needs {CUDA_RUNTIME}, the CUDA 13 runtime, which the dynamic "
        "loader does not find here: install the CUDA 13 toolkit, or add its lib folder to "
        "LD_LIBRARY_PATH"
    )


def _tvm_ffi_requirement() -> str:
    """apache-tvm-ffi at the version installed here: the one ``libtvm_runtime.so`` was built
    against."""
    try:
        return f"apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}"
    except metadata.PackageNotFoundError:
        return "apache-tvm-ffi"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
