"""Tests of the fgq-tvm command line, run as a subprocess the way a user runs it.

Every failure must be one line on stderr, ``fgq-tvm: error: ...``, exit status 2 for usage
errors and 1 otherwise, no traceback and no output file. One end-to-end test compiles the
CIFAR ResNet-20 once (about 15 s) and runs the module on real images against the PyTorch
reference.
"""

import _ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SHAPE, fgq_tvm, fgq_tvm_at_once, write_tiny_module

from fgq_tvm import cli, run_command
from fgq_tvm.data import CIFAR10_NPZ, data_dir, load_npz_split
from fgq_tvm.errors import UsageError
from fgq_tvm.runtime import module_digest, sidecar_path
from fgq_tvm.schedules.conv2d_dot import AVX2_CORE, VNNI_CORE
from fgq_tvm.summary import format_summary
from fgq_tvm.target import host_target, parse_target

RESNET20 = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"
RESNET56 = data_dir() / "cifar_resnet" / "resnet56-4bfd9763.th"
CALIB_IMAGES = 64


def error_message(result: subprocess.CompletedProcess, status: int) -> str:
    """Check that ``result`` failed with ``status`` and one error line; return the message."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fgq-tvm: error: "), result.stderr
    return lines[0].removeprefix("fgq-tvm: error: ")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Broken input files: weights of random bytes, calibration batches of wrong shape/dtype."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "corrupt.th").write_bytes(np.random.default_rng(0).bytes(4096))
    np.save(folder / "calib_shape.npy", np.zeros((4, 3, 16, 16), np.float32))
    np.save(folder / "calib_int64.npy", np.zeros((4, 3, 32, 32), np.int64))
    return folder


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An empty folder for a command's output."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


R20 = ["compile", "cifar_resnet20"]


def target_accepted(*target: str) -> tuple[list[str], int, str]:
    """A case that passes ``target``, which is checked before the (missing) weights file."""
    return [*R20, "--target", *target, "--weights", "none.th"], 1, "none.th does not exist"


# id -> (arguments, exit status, part of the message); "{in}" is the folder of `inputs`, "{out}"
# an empty output folder, and compile commands without -o write to {out}/m.so.
ERRORS = {
    "unknown model": (["compile", "nomodel"], 2, "unknown model 'nomodel'"),
    "missing weights": ([*R20, "--weights", "{in}/missing.th"], 1, "missing.th does not exist"),
    "corrupt weights": ([*R20, "--weights", "{in}/corrupt.th"], 1, "cannot load weights file"),
    "resnet56 weights": ([*R20, "--weights", RESNET56], 1, "a checkpoint for cifar_resnet56"),
    "target rocm": ([*R20, "--target", "rocm"], 2, "target kind 'rocm' is not supported"),
    "cuda arch": ([*R20, "--target", "cuda", "-arch=sm_50"], 2, "architecture 'sm_50' is not"),
    "cuda option": ([*R20, "--target", "cuda", "-mcpu=a"], 2, "-mcpu is not supported for cuda"),
    "unknown cpu": ([*R20, "--target", "llvm", "-mcpu=nonexistent"], 2, "'nonexistent' is unk"),
    "bad target json": ([*R20, "--target", "{bad json"], 2, "target JSON is malformed"),
    "group size 0": ([*R20, "--group-size", "0"], 2, "group size 0 is out of range"),
    "group size -1": ([*R20, "--group-size", "-1"], 2, "group size -1 is out of range"),
    "group size 65": ([*R20, "--group-size", "65"], 2, "group size 65 is out of range"),
    "group size abc": ([*R20, "--group-size", "abc"], 2, "group size 'abc' is not a number"),
    "act bits 3": ([*R20, "--act-bits", "3"], 2, "activation bits '3' are not supported"),
    "first-last act bits": ([*R20, "--first-last-act-bits", "16"], 2, "activation bits '16'"),
    "bad layer override": ([*R20, "--layer", "fc"], 2, "layer override 'fc' is malformed"),
    "bad scales": ([*R20, "--scales", "int4"], 2, "argument --scales: invalid choice"),
    "percentile 0": ([*R20, "--percentile", "0"], 2, "percentile 0.0 is out of range"),
    "calib images 0": ([*R20, "--calib-images", "0"], 2, "expected a positive integer, got '0'"),
    "input shape 3d": ([*R20, "--input-shape", "1,3,32"], 2, "input shape '1,3,32' is malformed"),
    "input shape 1ch": ([*R20, "--input-shape", "1,1,32,32"], 2, "does not accept input shape"),
    "calib shape": ([*R20, "--calib", "{in}/calib_shape.npy"], 1, "got shape [4, 3, 16, 16]"),
    "calib int64": ([*R20, "--calib", "{in}/calib_int64.npy"], 1, "normalised inputs, got int64"),
    "unknown flag": ([*R20, "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    "output dir missing": ([*R20, "-o", "{out}/missing/m.so"], 1, "output directory"),
    "output not .so": ([*R20, "-o", "{out}/m.txt"], 2, "must end in .so"),
    "output is a dir": ([*R20, "-o", "{out}"], 1, "is a directory"),
    "output folder unwritable": ([*R20, "-o", "/proc/m.so"], 1, "cannot write in the output fol"),
    "eval json unwritable": (
        ["eval", "cifar_resnet20", "--data", data_dir() / CIFAR10_NPZ, "--json", "/proc/e.json"],
        1,
        "cannot write in the output folder /proc",
    ),
    "layer matches nothing": ([*R20, "--layer", "nosuch*=float"], 2, "'nosuch*' matches no"),
    "target empty": ([*R20, "--target", ""], 2, "target is empty"),
    "target blank": ([*R20, "--target", "   "], 2, "target is empty"),
    "target json key": ([*R20, "--target", '{"kind": "llvm", "x": 1}'], 2, "option 'x'"),
    "target words": target_accepted("llvm", "-mcpu=znver4", "-mattr=+avx2,+fma"),
    "target quoted": target_accepted("llvm -mcpu=znver4 -mattr=+avx2"),
    "target json": target_accepted('{"kind": "llvm", "mcpu": "znver4", "mattr": ["+avx2"]}'),
    "no command": ([], 2, "required: COMMAND (see 'fgq-tvm --help')"),
    "unknown command": (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    "run without input": (["run", "m.so"], 2, "required: --input (see 'fgq-tvm run --help')"),
    "eval on calib split": (
        ["eval", "cifar_resnet20", "--data", data_dir() / CIFAR10_NPZ, "--split", "calib"],
        2,
        "calibrating on split 'calib' of the images evaluated on ('calib') measures nothing",
    ),
    "eval data missing": (
        ["eval", "cifar_resnet20", "--data", "{in}/missing.npz"],
        1,
        "missing.npz does not exist",
    ),
}


@pytest.fixture(scope="module")
def error_runs(inputs, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case of ERRORS run, four at a time (:func:`helpers.fgq_tvm_at_once`)."""
    outs, commands = {}, []
    for case, (args, _, _) in ERRORS.items():
        out = outs[case] = tmp_path_factory.mktemp("out")
        argv = [str(arg).replace("{in}", str(inputs)).replace("{out}", str(out)) for arg in args]
        if argv[:1] == ["compile"] and "-o" not in argv:
            argv += ["-o", str(out / "m.so")]
        commands.append(argv)
    results = fgq_tvm_at_once(*commands)
    return {case: (outs[case], result) for case, result in zip(ERRORS, results, strict=True)}


@pytest.mark.parametrize("case", ERRORS)
def test_error(error_runs, case):
    _, status, message = ERRORS[case]
    out, result = error_runs[case]
    assert message in error_message(result, status)
    assert list(out.iterdir()) == []


def test_join_target_words():
    argv = ["compile", "m", "--target", "llvm", "-mcpu=skylake", "-mattr=+avx2", "-o", "m.so"]
    joined = ["compile", "m", "--target", "llvm -mcpu=skylake -mattr=+avx2", "-o", "m.so"]
    assert cli.join_target_words(argv) == joined
    joined = ["--target=llvm -mcpu=x", "-o", "a"]
    assert cli.join_target_words(["--target=llvm", "-mcpu=x", "-o", "a"]) == joined
    assert cli.join_target_words(["-o", "a", "-mcpu=x"]) == ["-o", "a", "-mcpu=x"]


def test_parse_input_shape():
    assert cli.parse_input_shape("4,3,32,32") == (4, 3, 32, 32)
    for text in ("4,3,32", "4,3,0,32", "4,3,-1,32", "a,b,c,d", "4,3,32,32,1"):
        with pytest.raises(UsageError, match="malformed"):
            cli.parse_input_shape(text)


def test_default_target_is_the_host():
    from fgq_tvm.target import parse_target

    target = parse_target(host_target())
    assert target.kind.name == "llvm"


def boom(*args: object) -> float:
    return 1 / 0


def test_internal_error_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("FGQ_TVM_DEBUG", raising=False)
    monkeypatch.setattr(run_command, "read_npy", boom)
    assert cli.main(["run", "m.so", "--input", "x.npy"]) == 1
    assert capsys.readouterr().err == (
        "fgq-tvm: error: internal error: ZeroDivisionError: division by zero\n"
    )


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("FGQ_TVM_DEBUG", "1")
    monkeypatch.setattr(run_command, "read_npy", boom)
    with pytest.raises(ZeroDivisionError):
        cli.main(["run", "m.so", "--input", "x.npy"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny module in the fgq-tvm format (helpers.tiny_executable: per-channel means)."""
    return write_tiny_module(tmp_path_factory.mktemp("tiny") / "tiny.so")


@pytest.mark.parametrize(
    ("output", "what"),
    [
        ("good.so", "the module"),
        ("./good.so", "the module"),
        ("link.so", "the module"),
        ("hard.so", "the module"),
        ("good.so.json", "its sidecar"),
        ("link.json", "its sidecar"),
        ("x.npy", "the input"),
        ("../{dir}/x.npy", "the input"),
    ],
)
def test_run_refuses_to_overwrite_its_files(tmp_path, monkeypatch, capsys, output, what):
    monkeypatch.chdir(tmp_path)
    files = {"good.so": b"module", "good.so.json": b"{}", "x.npy": b"input"}
    for name, data in files.items():
        Path(name).write_bytes(data)
    Path("link.so").symlink_to("good.so")
    Path("link.json").symlink_to(tmp_path / "good.so.json")
    os.link("good.so", "hard.so")
    output = output.replace("{dir}", tmp_path.name)
    assert cli.main(["run", "good.so", "--input", str(tmp_path / "x.npy"), "--output", output]) == 2
    assert capsys.readouterr().err == (
        f"fgq-tvm: error: output {output!r} is {what}; give another file name\n"
    )
    assert {name: Path(name).read_bytes() for name in files} == files
    assert Path("link.so").is_symlink() and Path("link.json").is_symlink()


def test_run_refuses_non_finite_input(tiny, tmp_path, capsys):
    x = np.zeros((4, *TINY_SHAPE[1:]), np.float32)
    x[3, 0, 2, 1] = np.inf
    x[3, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    run = ["run", str(tiny), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y")]
    assert cli.main(run) == 1
    assert capsys.readouterr().err == (
        "fgq-tvm: error: input has 17 non-finite values (NaN or infinity), the first at "
        "[3, 0, 2, 1]; fix the input, or skip this check with check_finite=False (fgq-tvm run "
        "--allow-nonfinite)\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.npy"]
    assert cli.main([*run, "--allow-nonfinite"]) == 0
    logits = np.load(tmp_path / "y")
    assert np.isinf(logits[3, 0]) and np.isnan(logits[3, 2]) and np.isfinite(logits[:3]).all()


def test_format_summary_lists_float_layers():
    layer = {
        "name": "conv",
        "op": "conv2d",
        "weights": "ternary",
        "group_size": 8,
        "act_bits": 4,
        "act_signed": False,
        "kernel": "ternary_group_scales",
        "core": "bitplane",
        "layout": "NCHW",
        "input": "float32",
    }
    sidecar = {"layers": [layer], "float_layers": [{"name": "fc", "reason": "config: float"}]}
    lines = format_summary(sidecar, {"fc": "linear", "conv": "conv2d"}).splitlines()
    assert lines[1].split() == ["fc", "linear", "float", "stayed", "float:", "config:", "float"]
    assert lines[2].split() == [
        "conv",
        "conv2d",
        "ternary-group",
        "N=8",
        "u4",
        "ternary_group_scales",
        "bitplane",
        "NCHW",
        "float",
        "-",
        "default",
    ]
    assert lines[3].startswith("1 of 2 conv/linear layers became ternary-group operators, 0 int8")
    assert lines[3].endswith(", 1 stayed float")


# --- end to end: one compiled CIFAR ResNet-20 (the tests are marked slow) ----------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    module = tmp_path_factory.mktemp("r20") / "r20.so"
    target = ["--target", *host_target().split()]
    result = fgq_tvm(
        *R20, "--weights", RESNET20, *target, "-o", module, "--calib-images", CALIB_IMAGES,
        "--reconstruction", "off",  # the reference below is computed without it
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return module, result


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four CIFAR-10 evaluation images, normalised for the ResNet, as a float32 .npy."""
    from fgq_tvm.models import build_model

    _, spec = build_model("cifar_resnet20")
    x, _ = load_npz_split(data_dir() / CIFAR10_NPZ, "eval", spec, limit=4)
    path = tmp_path_factory.mktemp("images") / "x.npy"
    np.save(path, x.numpy())
    return path


@pytest.fixture(scope="module")
def reference_logits(images) -> np.ndarray:
    """The PyTorch reference of the compiled module: the same quantization, run in eager mode."""
    import torch

    from fgq_tvm.compiler import calibration_batches
    from fgq_tvm.config import QuantConfig
    from fgq_tvm.data import load_calibration
    from fgq_tvm.models import build_model
    from fgq_tvm.quant.quantize import quantize_model

    model, spec = build_model("cifar_resnet20", str(RESNET20))
    calibration, _ = load_calibration(None, spec, limit=CALIB_IMAGES)
    quantized = quantize_model(model, QuantConfig(), calibration_batches(calibration, spec))
    with torch.no_grad():
        return quantized.reference(torch.from_numpy(np.load(images))).numpy()


@pytest.mark.slow
def test_compile_writes_module_and_summary(compiled):
    module, result = compiled
    written = sorted(path.name for path in module.parent.iterdir())
    assert written == [".r20.so.lock", "r20.so", "r20.so.json"]  # the writers' lock stays
    assert json.loads(sidecar_path(module).read_text())["model"] == "cifar_resnet20"
    assert b".debug_info" not in module.read_bytes()  # linked without LLVM's debug info
    lines = result.stdout.splitlines()
    header = [
        "layer", "op", "weights", "act", "kernel", "core", "layout", "input", "epilogue",
        "schedule",
    ]  # fmt: skip
    assert lines[0].split() == header
    host = parse_target(host_target())  # a dot core where the CPU has VNNI or AVX2
    core = next((dot.name for dot in (VNNI_CORE, AVX2_CORE) if dot.available(host)), "bitplane")
    dot = core != "bitplane"
    blocked = "NCHW16c" if dot else "NCHW"
    stem_layouts = "NCHW->NCHW16c" if dot else "NCHW"  # RGB input: no whole block of 16
    stem = ["conv1", "conv2d", "int8", "s8", "int8", core, stem_layouts, "float", "relu"]
    assert lines[1].split() == [*stem, "default"]
    conv1 = ["layer1.0.conv1", "conv2d", "ternary-group", "N=4", "u8", "ternary_int8_scales"]
    conv2 = ["layer1.0.conv2", *conv1[1:]]
    rows = [line.split() for line in lines]
    # the dot core passes conv1's output to conv2 as bytes; the block's output stays float
    conv1_io, conv2_io = (["float", "relu_quantize"], ["bytes", "add_relu"]) if dot else (
        ["float", "relu"], ["float", "add_relu"]
    )  # fmt: skip
    assert [*conv1, core, blocked, *conv1_io, "default"] in rows
    assert [*conv2, core, blocked, *conv2_io, "default"] in rows
    assert (
        "18 of 20 conv/linear layers became ternary-group operators, 2 int8, 0 stayed float"
        in lines
    )
    assert lines[-1].startswith(f"wrote {module} (") and lines[-1].endswith(f"{module}.json")
    assert (
        f"warning: no --calib given: calibrated on {CALIB_IMAGES} CIFAR-10 images" in result.stderr
    )
    assert '] build for {"kind":"llvm"' in result.stderr


@pytest.mark.slow
def test_run_matches_reference(compiled, images, reference_logits, out_dir):
    module, _ = compiled
    result = fgq_tvm("run", module, "--input", images, "--output", out_dir / "y.npy")
    assert result.returncode == 0, result.stderr
    logits = np.load(out_dir / "y.npy")
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-4)
    top1 = " ".join(str(label) for label in reference_logits.argmax(axis=1))
    assert result.stdout.splitlines() == [
        f"output: [4, 10] float32 -> {out_dir / 'y.npy'}",
        f"top-1: {top1}",
    ]
    assert [path.name for path in out_dir.iterdir()] == ["y.npy"]


@pytest.mark.slow
def test_run_needs_no_torch(compiled, images):
    module, _ = compiled
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from fgq_tvm.cli import main\n"
        f"sys.exit(main(['run', {str(module)!r}, '--input', {str(images)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("output: [4, 10] float32")


@pytest.fixture(scope="module")
def bad_inputs(images, tmp_path_factory) -> Path:
    """Inputs for ``run``: wrong shape, float64, a text file."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    x = np.load(images)
    np.save(folder / "shape.npy", x[:, :, :16])
    np.save(folder / "float64.npy", x.astype(np.float64))
    (folder / "text.npy").write_text("not an array\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("shape.npy", "expected input of shape [N, 3, 32, 32], got [4, 3, 16, 32]"),
        ("float64.npy", "expected float32 input, got float64; convert it"),
        ("text.npy", "is not a .npy file"),
        ("missing.npy", "missing.npy does not exist"),
    ],
)
def test_run_bad_input(compiled, bad_inputs, out_dir, name, message):
    module, _ = compiled
    result = fgq_tvm("run", module, "--input", bad_inputs / name, "--output", out_dir / "y.npy")
    assert message in error_message(result, 1)
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
def test_run_output_directory_missing(compiled, images, out_dir):
    module, _ = compiled
    result = fgq_tvm("run", module, "--input", images, "--output", out_dir / "no" / "y.npy")
    assert "output directory" in error_message(result, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "is not a loadable fgq-tvm module (the file is truncated)"),
        ("foreign", "is not a loadable fgq-tvm module (AttributeError"),
        ("no sidecar", "was not written by fgq-tvm compile or its .json was removed"),
        ("another module", "does not match its sidecar (written by another compile?)"),
    ],
)
def test_run_unloadable_module(compiled, images, out_dir, tmp_path, kind, message):
    module, _ = compiled
    contents = {
        "truncated": module.read_bytes()[: module.stat().st_size // 2],
        "foreign": Path(_ctypes.__file__).read_bytes(),
        "no sidecar": module.read_bytes(),
        "another module": module.read_bytes() + b"\0",
    }
    copy = tmp_path / "copy.so"
    copy.write_bytes(contents[kind])
    if kind != "no sidecar":
        info = json.loads(sidecar_path(module).read_text())
        if kind != "another module":
            info["module_sha256"] = module_digest(copy)
        sidecar_path(copy).write_text(json.dumps(info))
    result = fgq_tvm("run", copy, "--input", images, "--output", out_dir / "y.npy")
    assert message in error_message(result, 1)
    assert list(out_dir.iterdir()) == []
