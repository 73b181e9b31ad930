"""Read ``torch.export.save`` archives (``.pt2``) without running code from them.

``torch.export.load`` unpickles parts of an archive with Python's full unpickler, which runs
whatever code the pickle names: a pickled weight or constant, an "opaque" constant, and the
example inputs (its safe unpickler is tried first, then the unsafe one); it also loads compiled
AOTInductor libraries. A ``.pt2`` file is data to fgq-tvm, so :func:`load_exported_program`

- refuses, before torch reads anything, an archive that is no intact zip file, that holds
  AOTInductor code, or whose weights or constants are stored as pickles or script objects
  (:func:`archive_problem`);
- then runs ``torch.export.load`` with every ``torch.load`` it makes restricted to PyTorch's
  weights-only unpickler (tensors, containers and numbers; nothing is called), so what the
  checks above do not foresee fails instead of running.

Plain CNN programs (tensors stored raw, example inputs a tuple of tensors) load unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.export.pt2_archive import constants as layout

from .errors import FGQError, brief

_RE_EXPORT = "re-export the model with torch.export.save, its weights as plain tensors"


def load_exported_program(path: Path) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` archive without executing pickled code or compiled libraries from it.

    Raises
    ------
    FGQError
        The file is missing, is no intact ``.pt2`` archive, or holds content that only an
        unsafe loader reads (:func:`archive_problem`).
    """
    if not path.is_file():
        raise FGQError(f"exported program {path} does not exist; write it with torch.export.save")
    problem = archive_problem(path)
    if problem:
        raise FGQError(f"refusing exported program {path}: {problem}")
    try:
        with _weights_only_unpickling(), _quiet_torch_export():
            return torch.export.load(path)
    except pickle.UnpicklingError:
        raise FGQError(
            f"refusing exported program {path}: it holds pickled objects other than tensors, "
            f"which fgq-tvm does not unpickle (they can run code); {_RE_EXPORT}"
        ) from None
    except Exception as error:
        raise FGQError(
            f"cannot load exported program {path} ({brief(error)}); write it with torch.export.save"
        ) from None


def archive_problem(path: Path) -> str | None:
    """Why the archive at ``path`` must not be handed to ``torch.export.load`` (``None``: it
    may): not an intact zip file, AOTInductor libraries, or weights or constants stored as
    pickles or script objects."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = {_inner_name(name): name for name in archive.namelist()}
            if damaged is not None:
                return f"its member {damaged} is damaged (truncated or altered); write it again"
            if layout.ARCHIVE_VERSION_PATH not in names:  # a truncated archive's last member
                return (
                    "it is not an intact .pt2 archive (truncated, or not written by "
                    "torch.export.save); write it again"
                )
            if any(name.startswith(layout.AOTINDUCTOR_DIR) for name in names):
                return "it holds compiled AOTInductor code, which fgq-tvm does not load"
            return _payload_problem(archive, names)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"it is not an intact .pt2 (zip) archive ({brief(error)}); write it again"


def _inner_name(name: str) -> str:
    """A member's name inside the archive's root folder, as torch's reader names it."""
    return name.split("/", 1)[1] if "/" in name else name


def _payload_problem(archive: zipfile.ZipFile, names: dict[str, str]) -> str | None:
    """The first weight or constant that ``torch.export.load`` would unpickle or load as a
    script object."""
    for inner, name in names.items():
        is_weights = inner.startswith(layout.WEIGHTS_DIR) and inner.endswith("config.json")
        if not (is_weights or inner.startswith(layout.CONSTANTS_DIR) and inner.endswith(".json")):
            continue
        try:
            entries = json.loads(archive.read(name))["config"].items()
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return f"{inner} is not a payload configuration ({brief(error)})"
        for key, entry in entries:
            path_name = str(entry.get("path_name", "")) if isinstance(entry, dict) else ""
            plain = is_weights or path_name.startswith(layout.TENSOR_CONSTANT_FILENAME_PREFIX)
            if not isinstance(entry, dict) or entry.get("use_pickle", True) or not plain:
                return (
                    f"{key!r} is stored as a pickle or script object, which fgq-tvm does not "
                    f"load (it can run code); {_RE_EXPORT}"
                )
    return None


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """Every ``torch.load`` inside uses the weights-only unpickler, whatever its caller asks."""
    unrestricted = torch.load

    @functools.wraps(unrestricted)
    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return unrestricted(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = unrestricted


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """No tracebacks from ``torch.export.load``'s own logging and no warnings: a failure is
    reported as one line by the caller."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
