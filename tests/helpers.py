"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, some gammas negative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                size = bn.num_features
                bn.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.2)
                bn.weight.copy_(torch.randn(size, generator=generator))
                bn.bias.copy_(torch.randn(size, generator=generator) * 0.3)
    return model.eval()


def fgq_tvm(*args: object) -> subprocess.CompletedProcess:
    """Run ``python -m fgq_tvm ARGS`` without FGQ_TVM_DEBUG."""
    env = {key: value for key, value in os.environ.items() if key != "FGQ_TVM_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "fgq_tvm", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
