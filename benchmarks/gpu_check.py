"""The GPU check of issue 18: fgq-tvm's CUDA modules on an NVIDIA GPU, against the reference
and against PyTorch, on a machine with PyTorch but neither TVM nor a network.

Two steps, one on each machine:

``python benchmarks/gpu_check.py prepare [--out build/gpu_check]`` (here, with fgq-tvm and
TVM) compiles with the defaults of ``fgq-tvm compile --target cuda``: one-layer models of every
kind of GEMM kernel (:data:`LAYER_CASES`), the CIFAR ResNet-20 at batch 100 (calibrated on the
CIFAR calibration split), ResNet-18 and ResNet-50 at batch 1 and 64 (random weights), and
at batch 1 once more with ``--cuda-graph`` (its kernels captured as one CUDA graph). It
writes the modules, the runtime that runs them (fgq-tvm's runtime modules,
``libtvm_runtime.so``, ``libtvm_runtime_cuda.so``, ``libcudart.so.13`` and the ``tvm_ffi``
package, with its compiled core for this Python and for the GPU machine's: ``--python``, 3.12,
taken from its wheel with pip), the 5,000 CIFAR eval images as bytes with their labels,
and the quantized reference's logits of every input. ``--target llvm`` builds the same for
this CPU, to try the run step here.

It also writes ``build/gpu_check.tar.xz``, the folder compressed: a device run carries the
working tree and the archive, 64 MiB together, so the archive is sorted by name and packed by
``xz -9``, whose 64 MiB window stores a model's second module (the same constants at another
batch) as matches; ``prepare`` says when the two exceed the limit.

``bash benchmarks/gpu_check.sh [build/gpu_check.tar.xz]`` (there) unpacks it and runs
``python gpu_check.py run``:

* each one-layer model on a random batch, in a process of its own (a kernel that faults the
  GPU fails its own check only): its output against the quantized reference's;
* the ResNet-20 module on the 5,000 eval images: top-1 agreement with the reference (target
  >= 99.9%), logits within 1e-4, top-1 accuracy against the reference's;
* ResNet-18 and ResNet-50 at batch 1 on random inputs: logits close to the reference's, and
  the CUDA-graph module's equal to the plain one's, input after input;
* latency of the ResNet-18/50 modules at batch 1 and 64, interleaved with PyTorch FP32 eager
  and FP16 channels_last (``cudnn.benchmark``), median of ``--repeats`` after warm-up, and the
  ratios; every runtime reads an input already on the GPU (fgq-tvm a PyTorch CUDA tensor, in
  place), and a second fgq-tvm column takes the NumPy array (its copy to the GPU included);
  PyTorch's rows read "n/a" without torchvision.

It prints the table and writes it to ``benchmarks/results/<gpu key>/gpu-check.md`` (and
``.json``); the exit status is 1 when a correctness check fails. Then, in processes of its
own, the GEMM tile search (:mod:`gemm_tiles`: ResNet-50's heaviest convolutions at batch 1 and
64, each with its default tiles, them pipelined, and others, 10 variants at most, checked
against each other and timed; a variant that fails costs only the rest of its layer), written
to ``gemm-tiles.md`` (and ``.json``) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gemm_tiles

HERE = Path(__file__).resolve().parent
BUILD = HERE.parent / "build" / "gpu_check"
RESULTS = HERE / "results"
CIFAR_BATCH = 100
TIMED_MODELS = ("resnet18", "resnet50")
TIMED_BATCHES = (1, 64)
RANDOM_IMAGES = 2
FROM_NUMPY = "fgq-tvm from NumPy"
TILES = "gemm_tiles"  # the tile search's modules (gemm_tiles.py)
GRAPH = "_graph"  # the name's end of a module whose kernels run as one CUDA graph
_compiled: dict = {}  # (model, batch) -> (its quantized network, its spec), as prepare made them
AGREEMENT_TARGET = 0.999
CARRY_MIB = 64  # what a device run carries: the working tree and the archive together
GPU_PYTHON = "3.12"  # the GPU machine's python3 (the device image's PyTorch venv)
LAYER_TOLERANCE = 1e-5  # relative: the GPU computes the reference's arithmetic, in its order
# One-layer models (conv, BatchNorm, ReLU; a residual block) of the kinds of GEMM kernel a
# network has: (name, input shape, conv2d arguments, residual block). Their extents are
# padded to whole tensor-core tiles, the stem reads float32, the others activation bytes.
LAYER_CASES = (
    ("stem_7x7_stride2", (2, 3, 37, 37), dict(in_channels=3, out_channels=64, kernel_size=7,
                                              stride=2, padding=3), False),
    ("conv3x3_residual", (3, 64, 14, 14), dict(in_channels=64, out_channels=64, kernel_size=3,
                                               padding=1), True),
    ("conv1x1_stride2", (4, 96, 9, 9), dict(in_channels=96, out_channels=48, kernel_size=1,
                                            stride=2), False),
    ("conv3x3_wide", (1, 256, 7, 7), dict(in_channels=256, out_channels=512, kernel_size=3,
                                          padding=1), False),
    ("dense_1000", (5, 512, 1, 1), None, False),
)  # fmt: skip


# --- prepare (here: fgq-tvm and TVM) ---------------------------------------------------------


def prepare(
    out: Path, target_text: str, models: tuple[str, ...] = TIMED_MODELS, python: str = GPU_PYTHON
) -> None:
    """Compile the modules, compute the references and copy the runtime (for this Python and
    for ``python``, the GPU machine's) into ``out``."""
    import numpy as np
    import torch

    from fgq_tvm.data import data_dir, load_npz_split
    from fgq_tvm.target import parse_target

    target = parse_target(target_text)
    out.mkdir(parents=True, exist_ok=True)
    for case in LAYER_CASES:
        _prepare_layer(out, target, *case)
    weights = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"
    npz = data_dir() / "cifar10" / "cifar10_test_jpeg.npz"
    reference, spec = _compile(out, "cifar_resnet20", CIFAR_BATCH, target, str(weights), str(npz))
    images, labels = load_npz_split(npz, "eval", spec)
    with torch.no_grad():
        logits = torch.cat([reference(batch) for batch in torch.split(images, CIFAR_BATCH)])
    np.savez_compressed(
        out / "cifar_eval.npz", images=_as_bytes(images, spec), labels=labels.numpy(),
        reference=logits.numpy(), mean=np.array(spec.mean), std=np.array(spec.std),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for model in models:
        for batch in TIMED_BATCHES:
            reference, spec = _compile(out, model, batch, target)
            if batch == 1 and target.kind.name == "cuda":
                _compile_graph(out, model, target)
            if batch == 1:
                x = torch.randn(RANDOM_IMAGES, *spec.input_shape[1:], generator=generator)
                with torch.no_grad():
                    expected = torch.cat([reference(image[None]) for image in x])
                np.savez(out / f"{model}_random.npz", x=x.numpy(), reference=expected.numpy())
    if target.kind.name == "cuda":
        gemm_tiles.prepare(out / TILES, target_text)
    _copy_runtime(out, python)
    for script in ("gpu_check.py", "gemm_tiles.py"):
        shutil.copy2(HERE / script, out / script)
    archive = out.with_name(out.name + ".tar.xz")
    # sorted, so that the modules of one model at two batches (the same constants) are
    # neighbours in the stream, and xz -9's 64 MiB dictionary stores the second as matches
    subprocess.run(
        ["tar", "--sort=name", "-C", str(out.parent), "-cJf", str(archive), out.name],
        check=True, env={**os.environ, "XZ_OPT": "-9"},
    )  # fmt: skip
    size = archive.stat().st_size / 2**20
    tree = _working_tree_mib()
    too_big = (
        f", with the {tree:.1f} MiB working tree more than the {CARRY_MIB} MiB a device run carries"
    )
    print(f"wrote {out} and {archive} ({size:.1f} MiB{too_big if size + tree > CARRY_MIB else ''})")


def _working_tree_mib() -> float:
    """The size of what a device run sends besides the archive: the repository's tracked and
    untracked-but-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=HERE.parent, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    paths = [HERE.parent / name.decode() for name in listed if name]
    return sum(path.stat().st_size for path in paths if path.is_file()) / 2**20


def _prepare_layer(out: Path, target, name: str, shape: tuple, conv, residual: bool) -> None:
    """Compile the one-layer model ``name`` and save a random input and its reference output."""
    import numpy as np
    import torch

    from fgq_tvm.compiler import compile_model
    from fgq_tvm.config import QuantConfig
    from fgq_tvm.models import ModelSpec

    torch.manual_seed(len(name))
    model = _one_layer_model(shape, conv, residual).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        features = model(x).shape[1]
    spec = ModelSpec(name, shape, (0.0,) * shape[1], (1.0,) * shape[1], num_classes=features)
    config = QuantConfig(method="exact", calibration="max")
    result = compile_model(model, spec, config, torch.randn(16, *shape[1:]), target,
                           out / f"layer_{name}.so")  # fmt: skip
    with torch.no_grad():
        reference = result.quantized.reference(x)
    np.savez(out / f"layer_{name}.npz", x=x.numpy(), reference=reference.numpy())
    print(f"compiled layer_{name}.so", flush=True)


def _one_layer_model(shape: tuple, conv, residual: bool):
    """conv, BatchNorm, ReLU, then a 1x1 conv that reads its activation bytes (or the two
    convs of a residual block, for ``residual``), flattened; a Linear layer on the flattened
    input where ``conv`` is ``None``."""
    import torch
    from torch import nn

    if conv is None:
        return nn.Sequential(nn.Flatten(), nn.Linear(shape[1], 1000))

    def unit(relu: bool):
        layers = [nn.Conv2d(**conv), nn.BatchNorm2d(conv["out_channels"])]
        return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = unit(True), unit(False)

        def forward(self, x):
            return torch.relu(self.second(self.first(x)) + x).flatten(1)

    channels = conv["out_channels"]
    reader = [nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()]
    return Residual() if residual else nn.Sequential(unit(True), *reader, nn.Flatten())


def _compile(out: Path, model: str, batch: int, target, weights=None, calib=None):
    """Compile ``model`` at ``batch`` as ``fgq-tvm compile`` would; returns the quantized
    reference and the spec."""
    from dataclasses import replace

    import torch

    from fgq_tvm.compiler import compile_model
    from fgq_tvm.defaults import quantization_inputs
    from fgq_tvm.models import build_model

    started = time.perf_counter()
    torch.manual_seed(0)  # one model's random weights alike at every batch (see prepare)
    float_model, spec = build_model(model, weights)
    spec = replace(spec, input_shape=(batch, *spec.input_shape[1:]))
    inputs = quantization_inputs(float_model, spec, {}, calib)
    output = out / f"{model}_b{batch}.so"
    result = compile_model(float_model, spec, inputs.quant, inputs.calibration, target, output)
    _compiled[model, batch] = result.quantized, spec
    elapsed = time.perf_counter() - started
    print(f"compiled {output.name} in {elapsed:.0f} s ({output.stat().st_size / 2**20:.1f} MiB)")
    return result.quantized.reference, spec


def _compile_graph(out: Path, model: str, target) -> None:
    """``{model}_b1.so``'s quantized network again, its kernels as one CUDA graph."""
    from fgq_tvm.compiler import compile_quantized

    quantized, spec = _compiled[model, 1]
    output = out / f"{model}_b1{GRAPH}.so"
    compile_quantized(quantized, spec, target, output, cuda_graph=True)
    print(f"compiled {output.name} ({output.stat().st_size / 2**20:.1f} MiB)")


def _as_bytes(images, spec):
    """Normalised images back to their bytes (exact for CIFAR's 8-bit pixels)."""
    import numpy as np

    mean = np.array(spec.mean, np.float32)[:, None, None]
    std = np.array(spec.std, np.float32)[:, None, None]
    pixels = (images.numpy() * std + mean) * 255
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _copy_runtime(out: Path, python: str) -> None:
    """fgq-tvm's runtime modules, TVM's runtime libraries and the ``tvm_ffi`` package, with
    its compiled core for this Python and for ``python``."""
    import tvm_ffi

    from fgq_tvm import bundle

    bundle.copy_loader(out)
    for source in bundle.runtime_libraries(gpu=True):
        shutil.copy2(source, out / source.name)
    ffi = Path(tvm_ffi.__file__).parent
    shutil.rmtree(out / "tvm_ffi", ignore_errors=True)
    unused = ("include", "3rdparty", "cmake", "__pycache__", "*.a")  # core links the test library
    shutil.copytree(ffi, out / "tvm_ffi", ignore=shutil.ignore_patterns(*unused))
    _add_ffi_core(out / "tvm_ffi", tvm_ffi.__version__, python)


def _add_ffi_core(folder: Path, version: str, python: str) -> None:
    """Add the compiled core of apache-tvm-ffi ``version`` for CPython ``python`` (from its
    wheel, which pip downloads) to the ``tvm_ffi`` package in ``folder``."""
    import tempfile
    import zipfile

    tag = python.replace(".", "")
    if list(folder.glob(f"core.cpython-{tag}-*.so")):
        return
    with tempfile.TemporaryDirectory() as wheels:
        platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)]
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", f"--python-version={python}", "--implementation=cp",
            *platforms, "-d", wheels, f"apache-tvm-ffi=={version}",
        ]  # fmt: skip
        if subprocess.run(command, capture_output=True).returncode != 0:
            print(f"gpu_check: warning: no apache-tvm-ffi {version} wheel for Python {python}: "
                  "the runtime runs only where python3 is this one", file=sys.stderr)  # fmt: skip
            return
        with zipfile.ZipFile(next(Path(wheels).glob("*.whl"))) as wheel:
            core = next(n for n in wheel.namelist() if n.startswith(f"tvm_ffi/core.cpython-{tag}"))
            (folder / Path(core).name).write_bytes(wheel.read(core))


# --- run (there: the runtime, NumPy and PyTorch) ---------------------------------------------


def run(folder: Path, results: Path, repeats: int, warmup: int) -> int:
    """The checks and the timing table (see the module docstring); returns the exit status
    (a module that cannot load or run: one line, status 1)."""
    sys.path.insert(0, str(folder))
    from fgq_tvm.errors import FGQError

    try:
        return _check_and_time(folder, results, repeats, warmup)
    except FGQError as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 1


def check_layer(folder: Path, name: str) -> dict:
    """Run the one-layer model ``name`` on its saved input: its largest error relative to the
    reference's largest output, and the share of outputs equal to the reference's."""
    import numpy as np

    import fgq_tvm

    data = np.load(folder / f"layer_{name}.npz")
    got = fgq_tvm.load(folder / f"layer_{name}.so")(data["x"])
    reference = data["reference"]
    error = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-30))
    return {"error": error, "equal": float((got == reference).mean())}


def _layer_checks(folder: Path) -> list:
    """:func:`check_layer` of every one-layer model, each in a process of its own."""
    checks = []
    for path in sorted(folder.glob("layer_*.so")):
        name = path.stem.removeprefix("layer_")
        command = [sys.executable, str(folder / "gpu_check.py"), "layer", str(folder), name]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            ok = result["error"] <= LAYER_TOLERANCE
            summary = f"max error {result['error']:.3g}, {result['equal']:.2%} equal"
        else:
            result, ok = {"error": float("inf")}, False
            summary = "failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"layer {name}: {summary}", flush=True)
        checks.append((f"layer {name}: relative error", result["error"], ok))
    return checks


def _check_and_time(folder: Path, results: Path, repeats: int, warmup: int) -> int:
    import numpy as np

    import fgq_tvm

    rows, checks = [], _layer_checks(folder)
    cifar = np.load(folder / "cifar_eval.npz")
    module = fgq_tvm.load(folder / f"cifar_resnet20_b{CIFAR_BATCH}.so")
    where = module.gpu.description if module.gpu else module.threads_reason
    print(f"gpu_check: {where}", flush=True)
    x = (cifar["images"].astype(np.float32) / 255 - cifar["mean"][:, None, None]) / cifar["std"][
        :, None, None
    ]
    logits = module(x.astype(np.float32))
    reference, labels = cifar["reference"], cifar["labels"]
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    close = float(np.isclose(logits, reference, rtol=1e-4, atol=1e-4).all(axis=1).mean())
    top1, reference_top1 = (
        float((logits.argmax(1) == labels).mean()),
        float((reference.argmax(1) == labels).mean()),
    )
    checks.append(("cifar_resnet20 top-1 agreement", agreement, agreement >= AGREEMENT_TARGET))
    checks.append(("cifar_resnet20 logits within 1e-4", close, close >= AGREEMENT_TARGET))
    print(
        f"cifar_resnet20, {len(labels)} eval images: agreement {agreement:.2%}, close {close:.2%}"
        f", top-1 {top1:.2%} (reference {reference_top1:.2%})",
        flush=True,
    )
    for model in sorted(path.name.split("_random")[0] for path in folder.glob("*_random.npz")):
        data = np.load(folder / f"{model}_random.npz")
        single = fgq_tvm.load(folder / f"{model}_b1.so")
        got = single(data["x"])
        error = float(np.abs(got - data["reference"]).max() / np.abs(data["reference"]).max())
        same = bool((got.argmax(1) == data["reference"].argmax(1)).all())
        checks.append((f"{model} random inputs, same top-1", error, same and error < 1e-3))
        graph_path = folder / f"{model}_b1{GRAPH}.so"
        if graph_path.is_file():
            graphed = fgq_tvm.load(graph_path)
            same = bool(all(np.array_equal(graphed(x[None]), single(x[None])) for x in data["x"]))
            checks.append((f"{model} batch 1 as a CUDA graph, same logits", float(same), same))
        for batch in TIMED_BATCHES:
            modules = single if batch == 1 else fgq_tvm.load(folder / f"{model}_b{batch}.so")
            rows.append(_time(model, batch, modules, repeats, warmup))
            rows[-1]["operators"] = _operator_profile(modules)
            if batch == 1 and graph_path.is_file():
                rows.append(_time(model, "1, CUDA graph", graphed, repeats, warmup))
                rows[-1]["operators"] = {}
    status = _report(results, where, checks, rows, top1, reference_top1)
    if module.gpu is not None and (folder / TILES / gemm_tiles.MANIFEST).is_file():
        _tile_search(folder, results / _device_key(where))
    return status


def _tile_search(folder: Path, results: Path) -> None:
    """The tile search (:mod:`gemm_tiles`), after everything else, in processes of its own: a
    variant that fails ends its process (its layer's rows so far kept), and the next one goes
    on from the next layer. Its table is printed and written to ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    rows_file = results / "gemm-tiles.jsonl"
    rows_file.unlink(missing_ok=True)
    layers = [
        entry["layer"] for entry in json.loads((folder / TILES / gemm_tiles.MANIFEST).read_text())
    ]
    while (done := len(_tile_rows_by_layer(rows_file))) < len(layers):
        command = [sys.executable, str(folder / "gpu_check.py"), "tiles", str(folder),
                   str(rows_file), "--start", str(done)]  # fmt: skip
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            print(f"gemm tiles: stopped after 10 minutes, at {layers[done]}")
            break
        if finished.returncode != 0:
            ended = f"its process ended with exit code {finished.returncode}"
            print(f"gemm tiles: {(finished.stderr.strip().splitlines() or [ended])[-1]}")
        if len(_tile_rows_by_layer(rows_file)) == done:  # no progress: give the layer up
            ended = "its process ended before any variant ran"
            _append_rows(rows_file, [{"layer": layers[done], "tiles": "-", "error": ended}])
    rows = [row for layer in _tile_rows_by_layer(rows_file).values() for row in layer]
    text = "\n".join(["# GEMM tiles", "", *gemm_tiles.table(rows)]) + "\n"
    print(text)
    (results / "gemm-tiles.md").write_text(text)
    (results / "gemm-tiles.json").write_text(json.dumps(rows, indent=1) + "\n")


def _tile_rows_by_layer(rows_file: Path) -> dict[str, list[dict]]:
    """The tile search's rows written so far, by layer (one JSON line per layer)."""
    if not rows_file.is_file():
        return {}
    layers = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    return {rows[0]["layer"]: rows for rows in layers}


def _append_rows(rows_file: Path, rows: list[dict]) -> None:
    with rows_file.open("a") as lines:
        lines.write(json.dumps(rows) + "\n")


def tile_search(folder: Path, rows_file: Path, start: int) -> int:
    """Run the tile search on GPU 0 from the ``start``-th layer on, appending each layer's rows
    to ``rows_file``; 1 when a variant failed (the message on stderr)."""
    try:
        gemm_tiles.run(folder / TILES, start, lambda rows: _append_rows(rows_file, rows))
    except gemm_tiles.VariantFault as fault:
        print(f"a variant failed: {fault}", file=sys.stderr)
        return 1
    return 0


def _time(model: str, batch: int, module, repeats: int, warmup: int) -> dict:
    """Median latency (ms) of the module and of PyTorch FP32 / FP16 channels_last, interleaved."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal(module.input_shape).astype(np.float32)
    runners = _fgq_runners(module, x)
    runners.update(_torch_runners(model, x, on_gpu=module.gpu is not None))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    for _ in range(repeats):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner()
            times[name].append((time.perf_counter() - started) * 1e3)
            time.sleep(0.01)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{model} batch {batch}: " + ", ".join(f"{n} {m:.3f} ms" for n, m in medians.items()))
    return {"model": model, "batch": batch, "ms": medians}


def _operator_profile(module, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds per inference of each operator (the device synchronised around
    each call: :meth:`~fgq_tvm.runtime.CompiledModel.operator_times`), slowest first."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal(module.input_shape).astype(np.float32)
    image = _on_gpu(module, x)
    times = module.operator_times(x if image is None else image, repeats)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return dict(sorted(medians.items(), key=lambda item: -item[1]))


def _fgq_runners(module, x) -> dict:
    """The module on an input already on its GPU (a PyTorch CUDA tensor, read in place, as
    PyTorch's runners read theirs) and on the NumPy array (copied there and back: what a
    NumPy caller pays); the NumPy runner alone without PyTorch or a GPU."""
    image = _on_gpu(module, x)
    if image is None:
        return {"fgq-tvm": lambda: module(x)}
    return {"fgq-tvm": lambda: module(image), FROM_NUMPY: lambda: module(x)}


def _on_gpu(module, x):
    """``x`` as a PyTorch tensor on the module's GPU; ``None`` for a CPU module or without
    PyTorch's CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if module.gpu is None or not torch.cuda.is_available():
        return None
    return torch.from_numpy(x).to(f"cuda:{module.gpu.index}")


def _torch_runners(model: str, x, on_gpu: bool) -> dict:
    """PyTorch FP32 eager and FP16 channels_last runners of ``model`` (random weights), or
    none without torchvision."""
    try:
        import torch
        import torchvision
    except ImportError:
        return {}
    torch.backends.cudnn.benchmark = True
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    fp32 = getattr(torchvision.models, model)(weights=None).eval().to(device)
    image = torch.from_numpy(x).to(device)
    runners = {"PyTorch FP32": _synchronized(lambda: fp32(image), device)}
    if device == "cuda":
        fp16 = getattr(torchvision.models, model)(weights=None).eval().to(device).half()
        fp16 = fp16.to(memory_format=torch.channels_last)
        half = image.half().to(memory_format=torch.channels_last)
        runners["PyTorch FP16 channels_last"] = _synchronized(lambda: fp16(half), device)
    return runners


def _synchronized(forward, device: str):
    import torch

    def run():
        with torch.inference_mode():
            forward()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def _report(results: Path, where: str, checks, rows, top1: float, reference_top1: float) -> int:
    """Print and write the table; 1 when a check failed."""
    key = _device_key(where)
    lines = [
        f"# GPU check on {where}",
        "",
        f"Host: {platform.node()}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| check | value | passed |",
        "| --- | --- | --- |",
        *(f"| {name} | {value:.6g} | {'yes' if ok else 'NO'} |" for name, value, ok in checks),
        "",
        f"CIFAR ResNet-20 top-1: {top1:.2%} compiled, {reference_top1:.2%} reference.",
        "",
        "Input on the GPU for fgq-tvm and PyTorch alike; the NumPy column adds the copies of a "
        "NumPy caller's input and logits.",
        "",
        "| model | batch | fgq-tvm (ms) | fgq-tvm from NumPy (ms) | PyTorch FP32 (ms) | "
        "PyTorch FP16 CL (ms) | vs FP32 | vs FP16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ms = row["ms"]
        ours, fp32 = ms["fgq-tvm"], ms.get("PyTorch FP32")
        fp16 = ms.get("PyTorch FP16 channels_last")
        cells = [f"{v:.3f}" if v else "n/a" for v in (ours, ms.get(FROM_NUMPY), fp32, fp16)]
        ratios = [f"{ours / v:.2f}x" if v else "n/a" for v in (fp32, fp16)]
        lines.append(f"| {row['model']} | {row['batch']} | {' | '.join(cells + ratios)} |")
    for row in rows:
        lines += _operator_lines(row) if row["operators"] else []
    text = "\n".join(lines) + "\n"
    print(text)
    folder = results / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu-check.md").write_text(text)
    record = {"device": where, "checks": checks, "rows": rows}
    (folder / "gpu-check.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(ok for _, _, ok in checks) else 1


def _operator_lines(row: dict, shown: int = 12) -> list[str]:
    """The slowest operators of one timed module, with their shares of the profiled
    inference."""
    operators = row["operators"]
    total, shown = sum(operators.values()), min(shown, len(row["operators"]))
    lines = [
        "",
        f"{row['model']} batch {row['batch']}, the {shown} slowest of {len(operators)} operators "
        f"(profiled inference {total:.3f} ms, synchronised around each call):",
        "",
        "| operator | ms | share |",
        "| --- | --- | --- |",
    ]
    for name, ms in list(operators.items())[:shown]:
        lines.append(f"| {name} | {ms:.4f} | {ms / total:.1%} |")
    return lines


def _device_key(where: str) -> str:
    """``GPU 0: NVIDIA H200 (...)`` -> ``cuda-nvidia-h200``; a CPU run -> ``cpu``."""
    if not where.startswith("GPU"):
        return "cpu"
    name = where.split(": ", 1)[1].split(" (")[0]
    return "cuda-" + "-".join(name.lower().split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    make = steps.add_parser("prepare", help="compile the modules and copy the runtime (here)")
    make.add_argument("--out", type=Path, default=BUILD)
    make.add_argument("--target", default="cuda", help="default: cuda (sm_90)")
    make.add_argument("--models", nargs="+", default=list(TIMED_MODELS))
    make.add_argument("--python", default=GPU_PYTHON, help="the GPU machine's Python version")
    check = steps.add_parser("run", help="check and time them (on the GPU machine)")
    check.add_argument("folder", type=Path, nargs="?", default=BUILD)
    check.add_argument("--results", type=Path, default=RESULTS)
    check.add_argument("--repeats", type=int, default=50)
    check.add_argument("--warmup", type=int, default=10)
    layer = steps.add_parser("layer", help="check one one-layer model (run calls it)")
    layer.add_argument("folder", type=Path)
    layer.add_argument("name")
    tiles = steps.add_parser("tiles", help="the GEMM tile search (run calls it)")
    tiles.add_argument("folder", type=Path)
    tiles.add_argument("rows", type=Path, help="the JSON lines file the rows are appended to")
    tiles.add_argument("--start", type=int, default=0, help="the first layer to run")
    args = parser.parse_args(argv)
    if args.step == "tiles":
        sys.path.insert(0, str(args.folder.resolve()))
        return tile_search(args.folder.resolve(), args.rows, args.start)
    if args.step == "prepare":
        prepare(args.out, args.target, tuple(args.models), args.python)
        return 0
    if args.step == "layer":
        sys.path.insert(0, str(args.folder.resolve()))
        print(json.dumps(check_layer(args.folder.resolve(), args.name)))
        return 0
    return run(args.folder.resolve(), args.results, args.repeats, args.warmup)


if __name__ == "__main__":
    sys.exit(main())
