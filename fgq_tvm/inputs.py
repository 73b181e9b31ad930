"""Input batches of a compiled module read from files, with NumPy alone (``fgq-tvm run`` needs
neither PyTorch nor the compiler)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import FGQError, brief

NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """Read a ``.npy`` array without pickles.

    Parameters
    ----------
    path
        The ``.npy`` file.

    Returns
    -------
    numpy.ndarray
        Its array.

    Raises
    ------
    FGQError
        The file is missing, unreadable or not a ``.npy`` array.
    """
    path = Path(path)
    if not path.is_file():
        raise FGQError(f"input file {path} does not exist; check the path")
    with path.open("rb") as file:
        if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise FGQError(f"{path} is not a .npy file; save the input with numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise FGQError(
            f"cannot read {path} as a .npy array ({brief(error)}); save the input with numpy.save"
        ) from None
