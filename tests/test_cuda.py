"""The cuda target on a machine without a GPU: targets, the GPU cores' choice, the build with
nvcc into the module, and the runtime's refusals.

The GPU cores' arithmetic is checked on the CPU in test_kernels.py; running the modules on a
GPU is benchmarks/gpu_check.sh's job.
"""

from __future__ import annotations

import ctypes.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import fgq_tvm_at_once, randomize_batchnorm
from torch import nn

import fgq_tvm
from fgq_tvm import cuda_binary
from fgq_tvm.compiler import compile_model
from fgq_tvm.config import QuantConfig
from fgq_tvm.errors import FGQError, UsageError
from fgq_tvm.models import ModelSpec
from fgq_tvm.quant.layers import ActQuant
from fgq_tvm.schedules.core import Conv2dShape
from fgq_tvm.schedules.select import select_core
from fgq_tvm.target import DEFAULT_CUDA_ARCH, parse_target, target_key

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
has_driver = ctypes.util.find_library("cuda") is not None
FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # the fatbin header's magic number, little-endian


class ResidualNet(nn.Module):
    """A stem, one residual block and a classifier: every kind of fused kernel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x := self.stem(x))))
        x = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


SPEC = ModelSpec("residual", (1, 3, 8, 8), (0.0,) * 3, (1.0,) * 3, num_classes=10)
CONFIG = QuantConfig(method="exact", calibration="max")


def compile_residual_net(target, output, **options):
    torch.manual_seed(0)
    model = randomize_batchnorm(ResidualNet()).eval()
    calibration = torch.randn(8, 3, 8, 8)
    return compile_model(model, SPEC, CONFIG, calibration, target, output, **options)


@pytest.fixture(scope="module")
def cuda_module(tmp_path_factory):
    return compile_residual_net(parse_target("cuda"), tmp_path_factory.mktemp("cuda") / "m.so")


def test_cuda_targets():
    assert target_key(parse_target("cuda")) == f"cuda-{DEFAULT_CUDA_ARCH}"
    assert target_key(parse_target(["cuda", "-arch=sm_80"])) == "cuda-sm_80"
    json_target = parse_target('{"kind": "cuda", "arch": "sm_89"}')
    assert str(json_target.attrs["arch"]) == "sm_89"
    assert str(json_target.host.kind.name) == "llvm"
    with pytest.raises(UsageError, match="default sm_90"):
        parse_target("cuda -arch=sm_61")


def test_gpu_cores_take_every_layer_on_a_cuda_target():
    shape = Conv2dShape(1, 64, 14, 14, 128, (3, 3), padding=(1, 1), group_size=4)
    act, cuda = ActQuant(0.1, 8, False), parse_target("cuda")
    for encoding in ("ternary_int8_scales", "ternary_asymmetric_int8_scales", "int8"):
        assert select_core(shape, act, encoding, cuda) == "int8-gemm-cuda"
    assert select_core(shape, act, "ternary_group_scales", cuda) == "bitplane-cuda"
    cpu = parse_target("llvm")
    assert select_core(shape, act, "ternary_group_scales", cpu) == "bitplane"


@needs_nvcc
def test_turing_gets_a_module_without_the_tensor_core_gemm(tmp_path):
    # sm_75 has no int8 mma.sync.m16n8k32 (nor cp.async): every layer on bitplane-cuda
    result = compile_residual_net(parse_target("cuda -arch=sm_75"), tmp_path / "m.so")
    assert {layer["core"] for layer in result.sidecar["layers"]} == {"bitplane-cuda"}
    assert cuda_binary.MARKER.format(arch="sm_75").encode() in result.output.read_bytes()


@needs_nvcc
def test_module_carries_compiled_gpu_code(cuda_module):
    data = cuda_module.output.read_bytes()
    assert b"__global__" not in data  # no CUDA source: loading needs no compiler
    marker = cuda_binary.MARKER.format(arch=DEFAULT_CUDA_ARCH).encode()
    assert data.count(marker) == 1
    target = json.loads(cuda_module.sidecar["target"])
    assert (target["kind"], target["arch"]) == ("cuda", DEFAULT_CUDA_ARCH)
    cores = {layer["core"] for layer in cuda_module.sidecar["layers"]}
    assert cores == {"int8-gemm-cuda"}
    epilogues = {layer["epilogue"] for layer in cuda_module.sidecar["layers"]}
    assert {"relu_quantize", "add_relu"} <= epilogues


@needs_nvcc
def test_cuda_graph_captures_the_kernels_between_input_and_logits(cuda_module, tmp_path):
    graphed = compile_residual_net(parse_target("cuda"), tmp_path / "g.so", cuda_graph=True)
    capture = b"vm.builtin.cuda_graph.run_or_capture"
    assert capture in graphed.output.read_bytes()
    assert capture not in cuda_module.output.read_bytes()
    with pytest.raises(FGQError, match="CUDA graphs need a cuda target, not llvm"):
        compile_residual_net(parse_target("llvm"), tmp_path / "c.so", cuda_graph=True)


@needs_nvcc
def test_nvcc_fatbin_round_trip():
    code = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    compiled = cuda_binary.compiled_cuda_source(code, "sm_90")
    assert compiled.startswith(cuda_binary.MARKER.format(arch="sm_90"))
    assert cuda_binary.embedded_fatbin(compiled)[:4] == FATBIN_MAGIC
    assert cuda_binary.embedded_fatbin(code) is None


@needs_nvcc
def test_nvcc_errors_are_one_line():
    with pytest.raises(FGQError, match="nvcc could not compile .* for sm_90: .*error") as error:
        cuda_binary.compiled_cuda_source("this is not CUDA\n", "sm_90")
    assert len(str(error.value).splitlines()) == 1


def test_build_without_nvcc_says_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FGQError, match="needs nvcc"):
        cuda_binary.compiled_cuda_source("", "sm_90")


@needs_nvcc
def test_a_gpu_module_asks_for_its_device(cuda_module):
    with pytest.raises(FGQError, match="runs on device 'cuda' only, not 'cpu'"):
        fgq_tvm.load(cuda_module.output, device="cpu")


@needs_nvcc
@pytest.mark.skipif(has_driver, reason="this machine has an NVIDIA driver")
def test_loading_without_a_gpu_is_one_clear_line(cuda_module, tmp_path):
    with pytest.raises(FGQError, match="no NVIDIA driver") as error:
        fgq_tvm.load(cuda_module.output)
    assert len(str(error.value).splitlines()) == 1
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 8, 8), np.float32))
    run = [sys.executable, "-m", "fgq_tvm", "run", str(cuda_module.output), "--input", str(x)]
    result = subprocess.run(run, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "libcuda.so.1" in result.stderr


def test_tune_refuses_a_cuda_target_before_any_work():
    command = ("tune", "cifar_resnet20", "--target", "cuda")
    for result in fgq_tvm_at_once(command, (*command, "--fp32")):
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "tune has no search for cuda targets yet" in result.stderr


def test_a_cpu_module_refuses_the_gpu(tmp_path):
    from helpers import write_tiny_module

    path = write_tiny_module(tmp_path / "tiny.so")
    with pytest.raises(FGQError, match="runs on device 'cpu' only, not 'cuda'"):
        fgq_tvm.load(path, device="cuda")


@needs_nvcc
def test_bundle_of_a_gpu_module_carries_the_cuda_runtime(cuda_module, tmp_path):
    from fgq_tvm.bundle import write_bundle

    bundle = write_bundle(cuda_module.output, tmp_path / "bundle")
    assert {"libtvm_runtime_cuda.so", "libcudart.so.13"} <= set(bundle.files)
    shipped = {path.name for path in (bundle.folder / "fgq_tvm").iterdir()}
    assert {"gpu_runtime.py", "cuda_binary.py"} <= shipped
