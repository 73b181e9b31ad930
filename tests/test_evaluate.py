"""fgq-tvm eval: accuracy counting, image sets, and the command on the real CIFAR-10 ResNet-20."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import fgq_tvm
from PIL import Image

from fgq_tvm.config import CALIB_IMAGES
from fgq_tvm.data import CIFAR10_NPZ, LabelledImages, data_dir, load_labelled_images
from fgq_tvm.evaluate import Accuracy, EvalResult, evaluate_models, module_predictor
from fgq_tvm.models import build_model

RESNET20 = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"


def labelled(labels: list[int]) -> LabelledImages:
    x = torch.zeros(len(labels), 3, 2, 2)
    y = torch.tensor(labels)

    def reader(size: int):
        return zip(x.split(size), y.split(size), strict=True)

    return LabelledImages("toy", len(labels), reader)


def test_top1_and_top5_are_counted_per_predictor():
    images = labelled([0, 1, 2, 3, 4, 5])
    scores = np.arange(10, dtype=np.float32)[::-1].copy()  # ranks classes 0, 1, 2, ...

    def ranked(x):
        return np.tile(scores, (len(x), 1))

    seen = []
    accuracies, top1 = evaluate_models(
        {"ranked": ranked}, images, batch_size=4, progress=lambda *a: seen.append(a)
    )
    assert accuracies["ranked"] == Accuracy(top1=1 / 6, top5=5 / 6, images=6)
    assert top1["ranked"].tolist() == [0] * 6
    assert seen == [(4, 6), (6, 6)]
    result = EvalResult(Accuracy(0.9, 1.0, 6), accuracies["ranked"])
    assert result.drop_top1 == pytest.approx(100 * (0.9 - 1 / 6))


class FixedBatchModule:
    """A stand-in for a compiled module of batch 4: logits = the first pixel, per class."""

    input_shape = (4, 3, 2, 2)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert len(x) % 4 == 0
        return np.repeat(x[:, :1, 0, 0], 10, axis=1)


def test_module_predictor_pads_the_last_batch():
    x = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 2, 2)
    logits = module_predictor(FixedBatchModule())(x.contiguous())
    assert logits.shape == (6, 10) and logits[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_image_folder_gets_imagenet_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(3):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{index}.png")
    _, spec = build_model("cifar_resnet20")
    images = load_labelled_images(tmp_path, spec)
    batches = list(images.batches(4))
    assert images.count == 6 and [len(y) for _, y in batches] == [4, 2]
    x = torch.cat([x for x, _ in batches])
    assert x.shape == (6, 3, 32, 32) and torch.cat([y for _, y in batches]).tolist() == [
        0, 0, 0, 1, 1, 1,
    ]  # fmt: skip
    assert load_labelled_images(tmp_path, spec, limit=4).count == 4


@pytest.mark.slow
def test_eval_of_the_compiled_module_on_cifar10(tmp_path):
    record = tmp_path / "r20.json"
    result = fgq_tvm(
        "eval", "cifar_resnet20", "--weights", RESNET20, "--data", data_dir() / CIFAR10_NPZ,
        "--images", 500, "--backend", "tvm", "--json", record, "--reconstruction", "off",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[####################] 500/500 images" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("cifar_resnet20 on 500 images of cifar10_test_jpeg.npz, split eval")
    assert lines[2].split()[:2] == ["full", "precision"] and lines[3].startswith("quantized")
    data = json.loads(record.read_text())
    assert data["images"] == 500 and data["backend"] == "tvm"
    assert data["calibration_images"] == CALIB_IMAGES  # without reconstruction
    assert data["top1_agreement_with_reference"] >= 0.99
    assert 0.7 < data["full_precision"]["top1"] < 0.9  # 81% on the whole eval split
    drop = 100 * (data["full_precision"]["top1"] - data["quantized"]["top1"])
    assert data["drop_top1_points"] == pytest.approx(drop)
    assert f"{drop:9.2f}" in lines[4]
