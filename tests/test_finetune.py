"""fgq-tvm finetune: the straight-through quantizers, the schedule, the augmentation, training
through the quantizers, and the command on the real CIFAR-10 ResNet-20."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import fgq_tvm
from torch import nn

from fgq_tvm.config import QuantConfig
from fgq_tvm.data import CIFAR10_NPZ, data_dir
from fgq_tvm.finetune import (
    CosineSchedule,
    FinetuneConfig,
    Int8Weight,
    TernaryWeight,
    augment,
    finetune,
)
from fgq_tvm.models import build_model
from fgq_tvm.quant.quantize import quantize_model
from fgq_tvm.quant.ternary import quantize_int8_per_channel, ternarize_groups

RESNET20 = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"


def test_weight_quantizers_pass_gradients_straight_through():
    weight = torch.randn(6, 8, 3, 3, requires_grad=True)
    ternary = TernaryWeight(group_size=4)(weight)
    expected = ternarize_groups(weight.detach(), 4).dequantize()
    torch.testing.assert_close(ternary, torch.from_numpy(expected))
    (ternary * torch.arange(ternary.numel()).reshape(ternary.shape)).sum().backward()
    torch.testing.assert_close(
        weight.grad, torch.arange(weight.numel()).reshape(weight.shape).float()
    )
    q, scale = quantize_int8_per_channel(weight.detach())
    expected = q.astype(np.float32) * scale[:, None, None, None]
    torch.testing.assert_close(Int8Weight()(weight), torch.from_numpy(expected))


def test_cosine_schedule_falls_from_start_to_zero():
    schedule = CosineSchedule(0.1, total_steps=4)
    rates = [schedule.next_rate() for _ in range(6)]
    assert rates[0] == pytest.approx(0.1) and rates[2] == pytest.approx(0.05)
    assert rates[4:] == [pytest.approx(0.0)] * 2


def test_augmentation_crops_and_flips_each_image_reproducibly():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    first = augment(x, torch.Generator().manual_seed(1))
    again = augment(x, torch.Generator().manual_seed(1))
    assert first.shape == x.shape and torch.equal(first, again)
    # every output row is a (possibly flipped, shifted by at most 2) piece of an input row
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for image in range(2):
        windows = padded[image].unfold(1, 16, 1).unfold(2, 16, 1)  # [3, 5, 5, 16, 16]
        candidates = [windows[:, i, j] for i in range(5) for j in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(first[image], c) for c in candidates)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_training_through_the_quantizers_lowers_the_loss_and_keeps_the_architecture():
    torch.manual_seed(0)
    model = TinyNet().eval()
    images = torch.randn(64, 3, 8, 8)
    labels = (images[:, 0].mean((1, 2)) > 0).long() + 2 * (images[:, 1].mean((1, 2)) > 0).long()
    config = QuantConfig(group_size=4, first_last="int8")
    quantized = quantize_model(model, config, [images])
    before = {key: value.clone() for key, value in model.state_dict().items()}
    settings = FinetuneConfig(epochs=8, minutes=10, batch_size=16, learning_rate=0.05)
    lines = []
    result = finetune(model, quantized.layers, images, labels, settings, lines.append)
    assert [epoch.epoch for epoch in result.epochs] == list(range(1, 9)) and len(lines) == 8
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert not any(isinstance(m, (TernaryWeight, Int8Weight)) for m in result.model.modules())
    assert not result.model.training
    tuned = result.model.state_dict()
    assert tuned.keys() == before.keys()
    assert not torch.equal(tuned["conv2.weight"], before["conv2.weight"])
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_time_budget_cuts_the_epochs():
    model = TinyNet().eval()
    images, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    quantized = quantize_model(model, QuantConfig(group_size=4), [images])
    settings = FinetuneConfig(epochs=50, minutes=1e-9, batch_size=16)
    assert len(finetune(model, quantized.layers, images, labels, settings).epochs) == 1


@pytest.mark.slow
def test_finetune_command_writes_a_checkpoint_that_compile_takes(tmp_path):
    checkpoint, record = tmp_path / "r20-ft.pt", tmp_path / "r20-ft.json"
    npz = data_dir() / CIFAR10_NPZ
    result = fgq_tvm(
        "finetune", "cifar_resnet20", "--weights", RESNET20, "--data", npz,
        "--group-size", 64, "--epochs", 1, "--images", 300, "-o", checkpoint, "--json", record,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1: loss" in result.stderr
    assert "fine-tuned 1 epochs in" in result.stdout
    assert "quantized after fine-tuning" in result.stdout
    data = json.loads(record.read_text())
    assert data["config"]["epochs"] == 1 and len(data["epochs"]) == 1
    assert set(data["accuracy"]) == {"full precision", "quantized", "quantized after fine-tuning"}
    model, _ = build_model("cifar_resnet20", str(checkpoint))  # loads as the architecture
    assert isinstance(model, nn.Module)
    compiled = fgq_tvm(
        "compile", "cifar_resnet20", "--weights", checkpoint, "--group-size", 64,
        "--reconstruction", "off", "-o", tmp_path / "r20-ft.so",
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    evaluated = fgq_tvm(
        "eval", "cifar_resnet20", "--weights", checkpoint, "--baseline-weights", RESNET20,
        "--data", npz, "--group-size", 64, "--images", 300, "--json", tmp_path / "eval.json",
        "--reconstruction", "off",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["baseline_weights"] == str(RESNET20)
    full_precision = data["accuracy"]["full precision"]  # the original weights, same 300 images
    assert evaluation["full_precision"]["top1"] == pytest.approx(full_precision)


def test_finetune_rejects_a_negative_distillation_weight(tmp_path):
    result = fgq_tvm(
        "finetune", "cifar_resnet20", "--data", data_dir() / CIFAR10_NPZ,
        "--distillation", -1, "-o", tmp_path / "x.pt",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fgq-tvm: error: --distillation -1.0 is negative: use 0 or more"
    ]
    assert not (tmp_path / "x.pt").exists()
