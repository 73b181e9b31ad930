"""Tests of BatchNorm folding and re-estimation in fgq_tvm.quant.batchnorm."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm
from torch import nn

from fgq_tvm.errors import FGQError
from fgq_tvm.quant.batchnorm import (
    batchnorm_affine,
    correct_batchnorm,
    find_conv_bn_pairs,
    fold_batchnorm,
    reestimate_batchnorm,
)
from fgq_tvm.quant.ternary import ternarize_groups


class LambdaLayer(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class CifarBlock(nn.Module):
    """A CIFAR ResNet basic block with the option A (slice and zero-pad) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        pad = (planes - in_planes) // 2
        self.shortcut = LambdaLayer(
            lambda x: F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, pad, pad), "constant", 0)
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        out = self.bn(self.conv(x))
        if out.sum() > 0:
            out = out * 2
        return self.head(out)


class SharedConvOutput(nn.Module):
    """The conv output feeds the BatchNorm and a second branch: it must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def assert_close(expected: torch.Tensor, actual: torch.Tensor, rel: float = 1e-4) -> None:
    assert ((expected - actual).norm() / expected.norm()).item() < rel


def fold_and_compare(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        assert_close(expected, folded(x))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    return folded


def test_fold_conv_bn_relu_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 5, 3, stride=2, bias=True),
        nn.BatchNorm2d(5),
        nn.ReLU(),
    )
    randomize_batchnorm(model)
    assert find_conv_bn_pairs(model) == [("0", "1"), ("3", "4")]
    folded = fold_and_compare(model, torch.randn(2, 3, 12, 12))
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None


def test_fold_resnet18():
    torch.manual_seed(1)
    model = randomize_batchnorm(torchvision.models.resnet18(weights=None))
    assert len(find_conv_bn_pairs(model)) == 20
    fold_and_compare(model, torch.randn(2, 3, 32, 32))


def test_fold_cifar_block_with_lambda_shortcut():
    torch.manual_seed(2)
    model = randomize_batchnorm(nn.Sequential(CifarBlock(8, 8, 1), CifarBlock(8, 16, 2)))
    assert find_conv_bn_pairs(model) == [
        ("0.conv1", "0.bn1"),
        ("0.conv2", "0.bn2"),
        ("1.conv1", "1.bn1"),
        ("1.conv2", "1.bn2"),
    ]
    fold_and_compare(model, torch.randn(2, 8, 8, 8))


def test_untraceable_model_falls_back_to_module_order():
    torch.manual_seed(3)
    model = randomize_batchnorm(Untraceable())
    assert find_conv_bn_pairs(model) == [("conv", "bn"), ("head.0", "head.1")]
    fold_and_compare(model, torch.randn(2, 3, 6, 6))


def test_conv_with_two_users_is_not_folded():
    assert find_conv_bn_pairs(SharedConvOutput()) == []


@pytest.mark.parametrize(
    ("builder", "count"),
    [
        (torchvision.models.alexnet, 0),
        (torchvision.models.vgg11, 0),
        (torchvision.models.resnet50, 53),
    ],
)
def test_pairs_of_torchvision_models(builder, count):
    with torch.device("meta"):
        model = builder(weights=None)
    assert len(find_conv_bn_pairs(model)) == count


def test_fold_without_batchnorm_is_a_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_folding_keeps_the_ternary_structure_exactly(asymmetric):
    torch.manual_seed(4)
    raw = torch.randn(6, 7, 3, 3)
    groups = ternarize_groups(raw, 4, "exact", asymmetric)
    conv = nn.Conv2d(7, 6, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(groups.dequantize()))
    model = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(6)))
    with torch.no_grad():
        model[1].weight[0] = 0.0
        model[1].weight[1] = -abs(model[1].weight[1])
    factor, _ = batchnorm_affine(model[1])
    fold_batchnorm(model)
    folded = groups.folded(factor)
    assert folded.values.dtype == np.int8 and folded.positive.dtype == np.float32
    assert np.all(folded.positive >= 0) and not folded.values[0].any()
    np.testing.assert_array_equal(folded.values[1], -groups.values[1])
    if asymmetric:  # a negative factor turns the negative weights positive
        assert folded.positive[1] == pytest.approx(groups.negative[1] * abs(factor[1]))
        assert folded.negative[1] == pytest.approx(groups.positive[1] * abs(factor[1]))
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), folded.dequantize())


def test_reestimate_batchnorm_uses_a_cumulative_average():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    model.train()
    batches = [torch.randn(4, 3, 8, 8) + i for i in range(3)]
    reestimate_batchnorm(model, batches)
    with torch.no_grad():
        outputs = [model[0](batch) for batch in batches]
    means = torch.stack([out.mean(dim=(0, 2, 3)) for out in outputs])
    variances = torch.stack([out.transpose(0, 1).reshape(4, -1).var(dim=1) for out in outputs])
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.3 and not model.training and not bn.training
    assert bn.num_batches_tracked.item() == 3


def test_reestimate_batchnorm_needs_batches():
    with pytest.raises(FGQError, match="at least one"):
        reestimate_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), [])


def conv_bn_pair_net() -> nn.Sequential:
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
    )  # fmt: skip
    return randomize_batchnorm(model).eval()


def test_correct_batchnorm_shifts_the_trained_mean_by_the_change_of_the_input():
    reference = conv_bn_pair_net()
    model = copy.deepcopy(reference)
    model[0].bias = nn.Parameter(torch.ones(4))  # the first BatchNorm's input: 1 higher
    correct_batchnorm(model, reference, [torch.randn(4, 3, 8, 8) + i for i in range(3)])
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean + 1)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    # corrected, the first BatchNorm gives the second one the reference's input back
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[4], name), getattr(reference[4], name))
    assert not model.training


def test_correct_batchnorm_scales_the_trained_variance_by_the_change_of_the_input():
    reference = conv_bn_pair_net()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # the first BatchNorm's input: twice the reference's
    batches = [torch.randn(4, 3, 8, 8) + i for i in range(3)]
    with torch.no_grad():
        inputs = torch.cat([reference[0](batch) for batch in batches])
    correct_batchnorm(model, reference, batches)
    shift = inputs.double().mean(dim=(0, 2, 3))  # 2 m - m
    expected_mean = reference[1].running_mean.double() + shift
    torch.testing.assert_close(model[1].running_mean.double(), expected_mean)
    torch.testing.assert_close(model[1].running_var, 4 * reference[1].running_var)


def test_correct_batchnorm_of_an_unchanged_model_changes_nothing():
    reference = conv_bn_pair_net()
    model = copy.deepcopy(reference)
    correct_batchnorm(model, reference, [torch.randn(2, 3, 8, 8)])
    for ours, theirs in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_correct_batchnorm_needs_batches():
    with pytest.raises(FGQError, match="at least one"):
        correct_batchnorm(conv_bn_pair_net(), conv_bn_pair_net(), [])
