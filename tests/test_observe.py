"""fgq_tvm.quant.observe: a module's inputs seen while the model runs, the rest skipped."""

from __future__ import annotations

import torch
from torch import nn

from fgq_tvm.quant.observe import observe_inputs, run_hooked


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_each_batch_stops_at_the_observed_module():
    after = Counting()
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), after)
    seen = []
    batches = [torch.randn(4, 3) for _ in range(3)]
    assert observe_inputs(model, model[1], batches, seen.append) == 3
    assert after.calls == 0 and not model[1]._forward_pre_hooks
    with torch.no_grad():
        for batch, x in zip(batches, seen, strict=True):
            torch.testing.assert_close(x, model[0](batch))


def test_a_module_the_model_never_calls_is_never_observed():
    model = nn.Sequential(nn.Linear(3, 2))
    seen = []
    assert observe_inputs(model, nn.ReLU(), [torch.randn(1, 3)], seen.append) == 0
    assert seen == []


def test_run_hooked_lets_a_forward_hook_replace_the_output_and_removes_it():
    model = nn.Sequential(nn.ReLU(), nn.Identity())
    outputs = []
    model[1].register_forward_hook(lambda module, args, output: outputs.append(output))
    run_hooked(model, torch.ones(2), [model[0]], lambda module, args, output: -output, pre=False)
    torch.testing.assert_close(outputs[0], -torch.ones(2))
    assert not model[0]._forward_hooks
