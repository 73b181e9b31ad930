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
    assert observe_inputs(model, {model[1]: seen.append}, batches) == 3
    assert after.calls == 0 and not model[1]._forward_pre_hooks
    with torch.no_grad():
        for batch, x in zip(batches, seen, strict=True):
            torch.testing.assert_close(x, model[0](batch))


def test_a_module_the_model_never_calls_is_never_observed():
    model = nn.Sequential(nn.Linear(3, 2))
    seen = []
    assert observe_inputs(model, {nn.ReLU(): seen.append}, [torch.randn(1, 3)]) == 0
    assert seen == []


def test_a_pass_stops_once_every_observed_module_has_its_input():
    after = Counting()
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2), after)
    first, second = [], []
    batches = [torch.randn(4, 3) for _ in range(2)]
    # given out of call order: the pass runs until the later one
    assert observe_inputs(model, {model[2]: second.append, model[0]: first.append}, batches) == 2
    assert after.calls == 0 and len(first) == len(second) == 2
    with torch.no_grad():
        torch.testing.assert_close(second[1], model[1](model[0](batches[1])))


def test_run_hooked_lets_a_forward_hook_replace_the_output_and_removes_it():
    model = nn.Sequential(nn.ReLU(), nn.Identity())
    outputs = []
    model[1].register_forward_hook(lambda module, args, output: outputs.append(output))
    run_hooked(model, torch.ones(2), [model[0]], lambda module, args, output: -output, pre=False)
    torch.testing.assert_close(outputs[0], -torch.ones(2))
    assert not model[0]._forward_hooks
