"""The ``run`` command: a compiled module on a ``.npy`` batch, its top-1 classes printed and its
logits saved.

``fgq-tvm run`` and the ``run.py`` of a folder written by ``fgq-tvm bundle`` (:func:`main`)
both call :func:`run_npy`. Like :mod:`fgq_tvm.runtime`, this needs NumPy and the TVM runtime
alone, and ships in bundles.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from .errors import UsageError, exit_status
from .inputs import read_npy
from .reporting import output_file, write_atomically
from .runtime import load, sidecar_path

MAX_TOP1_SHOWN = 16


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one-line :class:`UsageError`\\ s."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of the run command, ``--input``, ``--output`` and
    ``--allow-nonfinite``, to ``parser``.

    Parameters
    ----------
    parser
        The parser of ``fgq-tvm run`` or of a bundle's ``run.py``.
    """
    parser.add_argument("--input", required=True, metavar="X.npy", help="normalised float32 batch")
    parser.add_argument("--output", metavar="Y.npy", help="where to save the logits")
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="run inputs with NaN or infinite values (refused by default)",
    )


def run_npy(
    module: str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    allow_nonfinite: bool = False,
    prog: str = "fgq-tvm",
) -> int:
    """Run ``module`` on the batch in ``input``, print the top-1 classes, save the logits.

    Prints ``output: [N, K] float32 [-> Y.npy]`` and ``top-1: ...`` (the first
    :data:`MAX_TOP1_SHOWN`) on standard output, and ``PROG: <threads and why>`` on standard
    error.

    Parameters
    ----------
    module
        A ``.so`` written by ``fgq-tvm compile``, its sidecar beside it.
    input
        A ``.npy`` float32 NCHW batch, normalised as the sidecar says.
    output
        Where to save the logits as ``.npy`` (written whole or not at all), or None.
    allow_nonfinite
        Run inputs with NaN or infinite values (refused by default).
    prog
        The program name the threads line starts with.

    Returns
    -------
    int
        0.

    Raises
    ------
    FGQError
        Any problem with the files or the module; :class:`UsageError` where ``output`` is the
        module, its sidecar or the input (checked before anything runs).
    """
    output_path = output_file(Path(output)) if output is not None else None
    if output is not None:
        files = {"the module": module, "its sidecar": sidecar_path(module), "the input": input}
        refuse_overwriting(output, files)
    x = read_npy(input)
    model = load(module)
    logits = model(x, check_finite=not allow_nonfinite)
    where = model.threads_reason if model.gpu is None else model.gpu.description
    print(f"{prog}: {where}", file=sys.stderr, flush=True)
    if output_path is not None:
        write_atomically(output_path, lambda file: np.save(file, logits))
    print(f"output: {list(logits.shape)} {logits.dtype}" + (f" -> {output}" if output else ""))
    top1 = [str(label) for label in logits.reshape(len(logits), -1).argmax(axis=1)]
    more = f" ... ({len(top1) - MAX_TOP1_SHOWN} more)" if len(top1) > MAX_TOP1_SHOWN else ""
    print(f"top-1: {' '.join(top1[:MAX_TOP1_SHOWN])}{more}")
    return 0


def refuse_overwriting(output: str | os.PathLike, files: dict[str, str | os.PathLike]) -> None:
    """Refuse an ``output`` that names one of ``files`` (``description -> path``), also through
    another spelling of the path, a symbolic or a hard link.

    Raises
    ------
    UsageError
        ``output`` is one of ``files``.
    """
    for description, path in files.items():
        if _same_file(output, path):
            raise UsageError(f"output {str(output)!r} is {description}; give another file name")


def _same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name one file (which need not exist)."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def main(argv: Sequence[str], module: str | os.PathLike, prog: str = "run.py") -> int:
    """The ``run.py`` of a bundle: ``--input X.npy [--output Y.npy] [--allow-nonfinite]`` on
    ``module``, as ``fgq-tvm run MODULE`` (:func:`run_npy`), errors reported as one line.

    Parameters
    ----------
    argv
        The arguments after the program name.
    module
        The bundle's module.
    prog
        The program name of the messages.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for usage errors, 1 for other errors.
    """
    parser = OneLineParser(
        prog=prog,
        description=f"Run {Path(module).name} on a float32 NCHW batch and print the top-1 classes.",
        allow_abbrev=False,
    )
    add_run_options(parser)

    def command() -> int:
        args = parser.parse_args(list(argv))
        return run_npy(module, args.input, args.output, args.allow_nonfinite, prog)

    return exit_status(command, prog)
