"""Tests of the dataset and calibration loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fgq_tvm
from fgq_tvm.data import (
    data_dir,
    iterate_batches,
    load_calibration,
    load_npz_split,
    normalise_pixels,
)
from fgq_tvm.errors import FGQError, UsageError
from fgq_tvm.models import ModelSpec

CIFAR = ModelSpec("cifar", (1, 3, 32, 32), num_classes=10)
IMAGENET = ModelSpec("imagenet", (1, 3, 64, 64))


@pytest.fixture
def small_npz(tmp_path: Path) -> Path:
    """A 40-image set in the CIFAR-10 format: 4 classes of 10, first 5 of each for calib."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 10)
    calib = np.concatenate([np.arange(c * 10, c * 10 + 5) for c in range(4)])
    path = tmp_path / "small.npz"
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x=x, y=y, calib_idx=calib, eval_idx=np.setdiff1d(np.arange(40), calib))
    return path


def one_line_error(error_type: type[Exception], *args, **kwargs) -> str:
    with pytest.raises(error_type) as info:
        load_calibration(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_data_dir_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FGQ_TVM_DATA", raising=False)
    expected = Path(fgq_tvm.__file__).resolve().parents[2] / "shared" / "data"
    assert data_dir() == expected
    assert (data_dir() / "cifar10" / "cifar10_test_jpeg.npz").is_file()
    monkeypatch.setenv("FGQ_TVM_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def test_real_npz_splits_are_balanced_and_disjoint() -> None:
    path = data_dir() / "cifar10" / "cifar10_test_jpeg.npz"
    x, y = load_npz_split(path, "eval", CIFAR)
    assert x.shape == (5000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [500] * 10
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5
    calib, _ = load_npz_split(path, "calib", CIFAR, limit=200)
    assert calib.shape == (200, 3, 32, 32)
    assert not any(torch.equal(calib[0], image) for image in x)


def test_normalisation_and_resize() -> None:
    pixels = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    x = normalise_pixels(pixels, CIFAR)
    expected = (1 - torch.tensor(CIFAR.mean)) / torch.tensor(CIFAR.std)
    torch.testing.assert_close(x[0, :, 5, 5], expected)
    resized = normalise_pixels(pixels, IMAGENET)
    assert resized.shape == (2, 3, 64, 64)
    torch.testing.assert_close(resized[1, :, 40, 40], expected)


def test_limit_picks_a_deterministic_mixed_subset(small_npz: Path) -> None:
    x, y = load_npz_split(small_npz, "calib", CIFAR, limit=8)
    x2, y2 = load_npz_split(small_npz, "calib", CIFAR, limit=8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(set(y.tolist())) > 1
    _, y_all = load_npz_split(small_npz, "all", CIFAR)
    assert y_all.tolist() == np.repeat(np.arange(4), 10).tolist()


def test_npz_calibration(small_npz: Path) -> None:
    x, warning = load_calibration(small_npz, CIFAR, limit=6)
    assert x.shape == (6, 3, 32, 32) and warning is None
    x, _ = load_calibration(small_npz, IMAGENET, split="eval", limit=100)
    assert x.shape == (20, 3, 64, 64)


def test_default_calibration_uses_cifar_for_32x32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FGQ_TVM_DATA", raising=False)
    x, warning = load_calibration(None, CIFAR, limit=16)
    assert x.shape == (16, 3, 32, 32)
    assert "CIFAR-10" in warning and "--calib" in warning and "\n" not in warning


def test_default_calibration_falls_back_to_seeded_noise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FGQ_TVM_DATA", str(tmp_path))
    x, warning = load_calibration(None, CIFAR, limit=4)
    again, _ = load_calibration(None, CIFAR, limit=4)
    assert x.shape == (4, 3, 32, 32) and torch.equal(x, again)
    assert "random" in warning and "--calib" in warning
    x, _ = load_calibration(None, IMAGENET, limit=2)
    assert x.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_npy_calibration_accepts_float(tmp_path: Path, dtype: type) -> None:
    batch = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(dtype)
    np.save(tmp_path / "batch.npy", batch)
    x, warning = load_calibration(tmp_path / "batch.npy", CIFAR, limit=3)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32) and warning is None
    torch.testing.assert_close(x, torch.from_numpy(batch[:3].astype(np.float32)))


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((3, 32, 32), np.float32), ["[B, 3, 32, 32]", "[3, 32, 32]"]),
        (np.zeros((2, 3, 28, 28), np.float32), ["[B, 3, 32, 32]", "[2, 3, 28, 28]"]),
        (np.zeros((2, 3, 32, 32), np.uint8), ["float32", "uint8"]),
        (np.zeros((2, 3, 32, 32), np.bool_), ["float32", "bool"]),
        (np.full((2, 3, 32, 32), np.nan, np.float32), ["NaN"]),
    ],
)
def test_npy_calibration_errors(tmp_path: Path, array: np.ndarray, words: list[str]) -> None:
    np.save(tmp_path / "bad.npy", array)
    message = one_line_error(FGQError, tmp_path / "bad.npy", CIFAR)
    assert all(word in message for word in words)


def test_file_errors(tmp_path: Path, small_npz: Path) -> None:
    assert "does not exist" in one_line_error(FGQError, tmp_path / "none.npz", CIFAR)
    (tmp_path / "text.npy").write_text("hello")
    assert "cannot read" in one_line_error(FGQError, tmp_path / "text.npy", CIFAR)
    data = small_npz.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    assert "cannot read" in one_line_error(FGQError, tmp_path / "cut.npz", CIFAR)


def test_npz_missing_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "x_only.npz", x=np.zeros((4, 32, 32, 3), np.uint8))
    assert "'calib_idx'" in one_line_error(FGQError, tmp_path / "x_only.npz", CIFAR)
    x, _ = load_calibration(tmp_path / "x_only.npz", CIFAR, split="all")
    assert x.shape == (4, 3, 32, 32)
    with pytest.raises(FGQError, match="'y'"):
        load_npz_split(tmp_path / "x_only.npz", "all", CIFAR)
    np.savez(tmp_path / "float_x.npz", x=np.zeros((4, 32, 32, 3), np.float32))
    assert "uint8" in one_line_error(FGQError, tmp_path / "float_x.npz", CIFAR, split="all")


def test_usage_errors(small_npz: Path) -> None:
    assert "calib, eval, all" in one_line_error(UsageError, small_npz, CIFAR, split="train")
    with pytest.raises(UsageError):
        load_npz_split(small_npz, "test", CIFAR)
    one_line_error(UsageError, small_npz, CIFAR, limit=0)


def test_iterate_batches() -> None:
    x = torch.arange(10)
    assert [b.tolist() for b in iterate_batches(x, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(UsageError):
        list(iterate_batches(x, 0))
