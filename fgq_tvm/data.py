"""Datasets and calibration inputs.

Image sets come in the CIFAR-10 ``.npz`` format of ``<data>/cifar10/README.md``: ``x`` (N, H, W, 3)
uint8 RGB pixels, ``y`` (N,) int64 labels, and the index arrays ``calib_idx`` and ``eval_idx``.
They are returned as float32 NCHW tensors, scaled to [0, 1] and normalised with the model's
mean and std. When a model expects another spatial size than the images have, the images are
resized with bilinear interpolation (``torch.nn.functional.interpolate``, ``antialias=False``)
after normalisation.

Subsets of ``limit`` images are drawn with a fixed-seed random permutation of the split, so that
they are deterministic and mix all classes (the splits list the images class by class).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FGQError, UsageError, brief
from .models import ModelSpec

SPLITS = ("calib", "eval", "all")
DEFAULT_CALIB_LIMIT = 256
SUBSET_SEED = 0
CIFAR10_NPZ = Path("cifar10") / "cifar10_test_jpeg.npz"
CALIB_HINT = "pass --calib FILE (.npz in the CIFAR-10 format, or a normalised float32 .npy batch)"
IMAGE_FOLDER_HINT = "give an .npz in the CIFAR-10 format or a folder with one sub-folder per class"


def data_dir() -> Path:
    """The shared data folder: ``$FGQ_TVM_DATA``, else ``shared/data`` beside the checkout.

    Returns
    -------
    Path
        ``Path(os.environ["FGQ_TVM_DATA"])`` when set, else ``<repo>/../shared/data``.
    """
    env = os.environ.get("FGQ_TVM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _read_arrays(path: Path, keys: tuple[str, ...]) -> np.ndarray | dict[str, np.ndarray]:
    """Read a ``.npy`` array, or those of ``keys`` that an ``.npz`` holds, without pickles.

    A missing or unreadable file is a one-line FGQError.
    """
    if not path.is_file():
        raise FGQError(f"data file {path} does not exist; check the path")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {key: data[key] for key in keys if key in data.files}
        return data
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FGQError(
            f"cannot read {path} ({brief(exc)}); expected a NumPy .npz in the CIFAR-10 format "
            "or a .npy batch"
        ) from exc


def _member(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in arrays:
        raise FGQError(
            f"{path} has no {key!r} array; expected the keys x, y, calib_idx and eval_idx "
            "of shared/data/cifar10/README.md"
        )
    return arrays[key]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _subset(indices: np.ndarray, limit: int | None) -> np.ndarray:
    """All of ``indices``, or ``limit`` of them picked by a fixed-seed random permutation."""
    if limit is None or limit >= len(indices):
        return indices
    return indices[np.random.default_rng(SUBSET_SEED).permutation(len(indices))[:limit]]


def _split_indices(
    arrays: dict[str, np.ndarray], split: str, count: int, path: Path, limit: int | None
) -> np.ndarray:
    _check_split(split)
    if split == "all":
        return _subset(np.arange(count), limit)
    indices = _member(arrays, f"{split}_idx", path)
    if (
        indices.ndim != 1
        or indices.size == 0
        or not np.issubdtype(indices.dtype, np.integer)
        or indices.min() < 0
        or indices.max() >= count
    ):
        raise FGQError(f"{path}: {split}_idx must be a non-empty list of indices below {count}")
    return _subset(indices, limit)


def _check_pixels(x: np.ndarray, path: Path) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise FGQError(
            f"{path}: 'x' must be (N, H, W, 3) uint8 RGB pixels, got {x.shape} {x.dtype}; "
            "see shared/data/cifar10/README.md"
        )


def normalise_pixels(pixels: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """Turn NHWC uint8 RGB pixels into the model's normalised float32 NCHW input.

    Parameters
    ----------
    pixels
        (N, H, W, 3) uint8 array.
    spec
        The model's spec: its mean, std and input size.

    Returns
    -------
    torch.Tensor
        (N, 3, H', W') float32, resized bilinearly (no antialiasing) when (H', W') of
        ``spec.input_shape`` differs from (H, W).
    """
    if spec.input_shape[1] != 3:
        raise FGQError(
            f"{spec.name} takes {spec.input_shape[1]} input channels but the images are RGB; "
            "pass a .npy batch of the right shape"
        )
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x - mean) / std
    size = tuple(spec.input_shape[2:])
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return x.contiguous()


def load_npz_split(
    path: str | Path, split: str, spec: ModelSpec, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split of a CIFAR-10-format ``.npz`` as model inputs and labels.

    Parameters
    ----------
    path
        The ``.npz`` file.
    split
        ``"calib"``, ``"eval"`` or ``"all"``.
    spec
        The model's spec (normalisation and input size).
    limit
        Keep at most this many images, picked by a fixed-seed permutation; None keeps the whole
        split in index order.

    Returns
    -------
    x, y
        (N, C, H, W) float32 normalised inputs and (N,) int64 labels.
    """
    _check_split(split)
    path = Path(path)
    arrays = _read_arrays(path, ("x", "y", f"{split}_idx"))
    if not isinstance(arrays, dict):
        raise FGQError(f"{path} is a .npy array, not an .npz image set; pass the .npz file")
    x, y = _member(arrays, "x", path), _member(arrays, "y", path)
    _check_pixels(x, path)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise FGQError(
            f"{path}: 'y' must hold one integer label per image, got {y.shape} {y.dtype}"
        )
    indices = _split_indices(arrays, split, len(x), path, limit)
    return normalise_pixels(x[indices], spec), torch.from_numpy(y[indices].astype(np.int64))


def _npz_calibration(
    arrays: dict[str, np.ndarray], path: Path, spec: ModelSpec, split: str, limit: int
) -> torch.Tensor:
    x = _member(arrays, "x", path)
    _check_pixels(x, path)
    return normalise_pixels(x[_split_indices(arrays, split, len(x), path, limit)], spec)


def _npy_calibration(batch: np.ndarray, path: Path, spec: ModelSpec, limit: int) -> torch.Tensor:
    expected = tuple(spec.input_shape[1:])
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] == 0:
        raise FGQError(
            f"{path}: expected a [B, {', '.join(map(str, expected))}] batch for {spec.name}, "
            f"got shape {list(batch.shape)}; save normalised NCHW inputs"
        )
    if not np.issubdtype(batch.dtype, np.floating):
        raise FGQError(
            f"{path}: expected float32 normalised inputs, got {batch.dtype}; "
            "save the batch after normalisation, as float32"
        )
    if not np.isfinite(batch).all():
        raise FGQError(f"{path}: the batch contains NaN or infinite values; fix the inputs")
    return torch.from_numpy(batch[:limit].astype(np.float32))


def has_real_calibration(path: str | Path | None, spec: ModelSpec) -> bool:
    """Whether :func:`load_calibration` would return real images for ``path`` (a file given, or
    the default CIFAR-10 calibration split present for a 3x32x32 model), not random ones."""
    return path is not None or default_cifar_data(spec) is not None


def default_cifar_data(spec: ModelSpec) -> Path | None:
    """The CIFAR-10 ``.npz`` under :func:`data_dir` when it exists and ``spec`` is 3x32x32."""
    cifar = data_dir() / CIFAR10_NPZ
    return cifar if tuple(spec.input_shape[1:]) == (3, 32, 32) and cifar.is_file() else None


def _default_calibration(spec: ModelSpec, limit: int) -> tuple[torch.Tensor, str]:
    """The CIFAR-10 calibration split for 32x32 models when present, else seeded noise."""
    cifar = default_cifar_data(spec)
    if cifar is not None:
        x, _ = load_npz_split(cifar, "calib", spec, limit)
        return x, (
            f"no --calib given: calibrated on {len(x)} CIFAR-10 images of {cifar}; "
            f"{CALIB_HINT} to use your own"
        )
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    x = torch.randn((limit, *spec.input_shape[1:]), generator=generator)
    return x, (
        f"no --calib given: calibrated on {limit} random normal images, so activation ranges "
        f"may not fit real data; {CALIB_HINT}"
    )


def load_calibration(
    path: str | Path | None,
    spec: ModelSpec,
    split: str = "calib",
    limit: int = DEFAULT_CALIB_LIMIT,
) -> tuple[torch.Tensor, str | None]:
    """Load the calibration inputs of a model.

    Parameters
    ----------
    path
        A CIFAR-10-format ``.npz`` (its ``split`` is used, ``limit`` images picked by a fixed-seed
        permutation), or a ``.npy`` batch [B, C, H, W] already normalised for the model (any
        float dtype, converted to float32; the first ``limit`` images are used). The format is
        recognised from the content, not the extension. None selects the default: the
        CIFAR-10 calibration split under :func:`data_dir` for 3x32x32 models when it exists,
        else ``limit`` standard normal images drawn with a fixed seed.
    spec
        The model's spec (input shape and normalisation).
    split
        Which split of an ``.npz`` to use: ``"calib"``, ``"eval"`` or ``"all"``.
    limit
        The most images to return.

    Returns
    -------
    x, warning
        (N, C, H, W) float32 inputs, and a one-line warning when the default was used (else
        None).

    Raises
    ------
    UsageError
        Unknown ``split`` or a ``limit`` below 1.
    FGQError
        Missing or unreadable file, missing ``.npz`` keys, or a ``.npy`` of the wrong shape
        or dtype.
    """
    if limit < 1:
        raise UsageError(f"the calibration image count must be at least 1, got {limit}")
    _check_split(split)
    if path is None:
        return _default_calibration(spec, limit)
    path = Path(path)
    data = _read_arrays(path, ("x", f"{split}_idx"))
    if isinstance(data, dict):
        return _npz_calibration(data, path, spec, split, limit), None
    return _npy_calibration(data, path, spec, limit), None


def iterate_batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield consecutive slices of ``x`` along dim 0, the last one possibly shorter.

    Parameters
    ----------
    x
        The tensor to split.
    batch_size
        Rows per batch, at least 1.
    """
    if batch_size < 1:
        raise UsageError(f"the batch size must be at least 1, got {batch_size}")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


@dataclass(frozen=True)
class LabelledImages:
    """A labelled image set to evaluate on, read batch by batch.

    Attributes
    ----------
    description
        Where the images come from, for reports (``cifar10_test_jpeg.npz, split eval``).
    count
        How many images :meth:`batches` yields.
    reader
        ``batch_size -> iterator of (x, labels)``: what :meth:`batches` returns.
    """

    description: str
    count: int
    reader: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, labels)``: normalised float32 NCHW inputs and int64 labels, ``batch_size`` at a
        time (the last batch may be shorter)."""
        if batch_size < 1:
            raise UsageError(f"the batch size must be at least 1, got {batch_size}")
        return self.reader(batch_size)


def load_labelled_images(
    path: str | Path, spec: ModelSpec, split: str = "eval", limit: int | None = None
) -> LabelledImages:
    """A labelled image set: an ``.npz`` in the CIFAR-10 format (its ``split``) or an
    ImageFolder directory (one sub-folder of images per class, classes in sorted order: the
    ImageNet layout; ``split`` does not apply).

    Folder images get torchvision's standard ImageNet preprocessing for the model's input size
    ``s``: resize the shorter side to ``s * 256 / 224``, crop the centre ``s x s``, scale to
    [0, 1] and normalise with the model's mean and std. ``limit`` keeps that many images
    (npz: a fixed-seed subset, :func:`load_npz_split`; folder: a fixed-seed subset too).
    """
    path = Path(path)
    if path.is_dir():
        return _image_folder(path, spec, limit)
    x, y = load_npz_split(path, split, spec, limit)

    def batches(batch_size: int):
        return zip(x.split(batch_size), y.split(batch_size), strict=True)

    return LabelledImages(f"{path.name}, split {split}", len(y), batches)


def _image_folder(path: Path, spec: ModelSpec, limit: int | None) -> LabelledImages:
    from torchvision import datasets, transforms

    size = spec.input_shape[-1]
    preprocess = transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    try:
        folder = datasets.ImageFolder(str(path), transform=preprocess)
    except (FileNotFoundError, OSError) as error:
        reason = brief(error)
        raise FGQError(f"{path} is no image folder ({reason}): {IMAGE_FOLDER_HINT}") from None
    indices = _subset(np.arange(len(folder)), limit)
    if len(folder.classes) > spec.num_classes:
        raise FGQError(
            f"{path} has {len(folder.classes)} classes but {spec.name} predicts "
            f"{spec.num_classes}; {IMAGE_FOLDER_HINT}"
        )

    def batches(batch_size: int):
        for start in range(0, len(indices), batch_size):
            items = [folder[int(i)] for i in indices[start : start + batch_size]]
            images = torch.stack([image for image, _ in items])
            yield images, torch.tensor([label for _, label in items], dtype=torch.int64)

    return LabelledImages(f"{path.name}/ ({len(folder.classes)} classes)", len(indices), batches)
