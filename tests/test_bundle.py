"""Tests of deployment with the TVM runtime alone: ``fgq_tvm.load`` and ``fgq-tvm run`` never
import the ``tvm`` package (only ``tvm_ffi`` and ``libtvm_runtime.so``), and ``fgq-tvm bundle``
writes a folder that runs with only NumPy and apache-tvm-ffi.

Most tests use the tiny hand-built module of helpers.py; the slow one compiles a CIFAR ResNet-20
(about 20 s), installs NumPy and apache-tvm-ffi into a fresh virtual environment with pip
(which needs the package index) and runs the bundle there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SHAPE, tiny_sidecar, write_tiny_module
from test_imports import import_graph

import fgq_tvm
from fgq_tvm import bundle, runtime
from fgq_tvm.bundle import SHIPPED_MODULES

PACKAGE = Path(fgq_tvm.__file__).resolve().parent
NO_TVM = (
    "assert 'tvm' not in sys.modules, 'tvm was imported'\n"
    "assert 'tvm_ffi' in sys.modules\n"
    "assert 'libtvm_compiler' not in open('/proc/self/maps').read()\n"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_module(tmp_path_factory.mktemp("tiny") / "tiny.so")


@pytest.fixture
def x_npy(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((4, *TINY_SHAPE[1:]), np.float32))
    return path


def clean_env() -> dict[str, str]:
    """This environment without Python's variables (PYTHONPATH would let the virtual
    environment see fgq_tvm) and FGQ_TVM_DEBUG."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PYTHON") and key not in ("VIRTUAL_ENV", "FGQ_TVM_DEBUG")
    }


def python(*args: object, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **env},
    )


def test_load_and_run_import_no_tvm(tiny):
    code = (
        "import sys, numpy as np, fgq_tvm\n"
        f"model = fgq_tvm.load({str(tiny)!r})\n"
        f"x = np.ones({TINY_SHAPE}, np.float32)\n"
        "print(model(x).tolist())\n"
        "model.operator_times(x, repeats=1)\n" + NO_TVM
    )
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[1.0] * 3] * 2


def test_fgq_tvm_run_imports_no_tvm(tiny, x_npy):
    code = (
        "import sys\n"
        "from fgq_tvm.cli import main\n"
        f"assert main(['run', {str(tiny)!r}, '--input', {str(x_npy)!r}]) == 0\n" + NO_TVM
    )
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("output: [4, 3] float32\ntop-1: ")


def test_module_for_another_cpu_is_refused_without_tvm(tiny, tmp_path):
    # the CPU check reads fgq_tvm.x86_tables, not LLVM
    path = tmp_path / "m.so"
    shutil.copyfile(tiny, path)
    target = json.dumps({"kind": "llvm", "mcpu": "skylake", "mattr": ["+avx512vnni"]})
    runtime.sidecar_path(path).write_text(json.dumps({**tiny_sidecar(path), "target": target}))
    code = (
        "import sys, fgq_tvm\n"
        "from fgq_tvm import cpu_features\n"
        "from fgq_tvm.errors import FGQError\n"
        "cpu_features.host_flags = lambda: {'sse4_1', 'sse4_2', 'avx', 'avx2', 'fma', 'f16c'}\n"
        "try:\n"
        f"    fgq_tvm.load({str(path)!r})\n"
        "except FGQError as error:\n"
        "    print(error)\n"
        "assert 'tvm' not in sys.modules\n"
    )
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert "compiled for another CPU" in result.stdout
    assert "may use bmi2, avx512f, avx512vnni, which this CPU lacks" in result.stdout


def test_runtime_library_is_found_without_tvm(monkeypatch, tmp_path):
    installed = runtime.runtime_library()
    assert installed.name == "libtvm_runtime.so" and installed.parent.name == "lib"
    (tmp_path / "libtvm_runtime.so").write_bytes(b"")
    monkeypatch.setenv("TVM_LIBRARY_PATH", str(tmp_path))
    assert runtime.runtime_library() == tmp_path / "libtvm_runtime.so"
    monkeypatch.setenv("TVM_LIBRARY_PATH", str(tmp_path / "none"))
    monkeypatch.setattr(runtime, "_tvm_package_folders", lambda: [])
    with pytest.raises(fgq_tvm.errors.FGQError, match="cannot find libtvm_runtime.so: install"):
        runtime.runtime_library()


def test_shipped_modules_import_only_each_other():
    graph = import_graph()
    shipped = {"fgq_tvm" if name == "__init__" else f"fgq_tvm.{name}" for name in SHIPPED_MODULES}
    for module in shipped:
        assert graph[module] <= shipped, (module, graph[module] - shipped)


def fgq_tvm_cli(*args: object, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "FGQ_TVM_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "fgq_tvm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**environ, **env},
    )


@pytest.fixture(scope="module")
def tiny_bundle(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    result = fgq_tvm_cli("bundle", tiny, "-o", out)
    assert result.returncode == 0, result.stderr
    return out


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_bundle_writes_a_self_contained_folder(tiny, tmp_path):
    out = tmp_path / "deep" / "deploy"
    result = fgq_tvm_cli("bundle", tiny, "-o", out)
    assert result.returncode == 0, result.stderr
    size = folder_size(out)
    assert result.stdout == (
        f"wrote {out}: tiny.so, tiny.so.json, libtvm_runtime.so, fgq_tvm/, run.py, "
        f"requirements.txt ({size / 1e6:.1f} MB)\n"
    )
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(
        ["tiny.so", "tiny.so.json", "libtvm_runtime.so", "fgq_tvm", "run.py", "requirements.txt"]
    )
    assert (out / "tiny.so").read_bytes() == tiny.read_bytes()
    assert (out / "tiny.so.json").read_bytes() == runtime.sidecar_path(tiny).read_bytes()
    assert (out / "libtvm_runtime.so").read_bytes() == runtime.runtime_library().read_bytes()
    shipped = sorted(path.name for path in (out / "fgq_tvm").iterdir())
    assert shipped == sorted(f"{name}.py" for name in SHIPPED_MODULES)
    for name in shipped:  # the same code, not a variant
        assert (out / "fgq_tvm" / name).read_bytes() == (PACKAGE / name).read_bytes(), name
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert requirements == ["numpy>=1.24", f"apache-tvm-ffi=={installed('apache-tvm-ffi')}"]
    assert [path.name for path in out.parent.iterdir()] == ["deploy"]  # no temporary left


def installed(distribution: str) -> str:
    from importlib import metadata

    return metadata.version(distribution)


def run_outputs(result: subprocess.CompletedProcess, output: Path) -> tuple[str, np.ndarray]:
    assert result.returncode == 0, result.stderr
    return result.stdout.replace(str(output), "Y"), np.load(output)


def test_run_py_behaves_like_fgq_tvm_run(tiny, tiny_bundle, x_npy, tmp_path):
    one = {"TVM_NUM_THREADS": "1"}
    run_py = tiny_bundle / "run.py"
    bundled = python(run_py, "--input", x_npy, "--output", tmp_path / "y1.npy", **one)
    full = fgq_tvm_cli("run", tiny, "--input", x_npy, "--output", tmp_path / "y2.npy", **one)
    stdout, logits = run_outputs(bundled, tmp_path / "y1.npy")
    full_stdout, full_logits = run_outputs(full, tmp_path / "y2.npy")
    assert stdout == full_stdout
    assert stdout.startswith("output: [4, 3] float32 -> Y\ntop-1: ")
    assert logits.tobytes() == full_logits.tobytes()
    assert bundled.stderr == "run.py: 1 thread: TVM_NUM_THREADS=1 in the environment\n"
    assert full.stderr == "fgq-tvm: 1 thread: TVM_NUM_THREADS=1 in the environment\n"


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--input", "{tmp}/none.npy"], 1, "input file {tmp}/none.npy does not exist; check"),
        ([], 2, "the following arguments are required: --input (see 'run.py --help')"),
        (["--input", "{x}", "--output", "{out}/tiny.so"], 2, "is the module; give another"),
        (["--input", "{x}", "--output", "{tmp}/no/y.npy"], 1, "output directory '{tmp}/no' does"),
    ],
)
def test_run_py_errors_are_one_line(tiny_bundle, x_npy, tmp_path, args, status, message):
    fill = {"tmp": tmp_path, "x": x_npy, "out": tiny_bundle}
    result = python(tiny_bundle / "run.py", *[arg.format(**fill) for arg in args])
    assert result.returncode == status
    assert result.stdout == ""
    assert re.fullmatch(r"run\.py: error: [^\n]+\n", result.stderr), result.stderr
    assert message.format(**fill) in result.stderr


def test_bundle_into_an_empty_folder(tiny, tmp_path):
    (tmp_path / "b").mkdir()
    assert fgq_tvm_cli("bundle", tiny, "-o", tmp_path / "b").returncode == 0
    assert (tmp_path / "b" / "run.py").is_file()


def broken_sidecar(tiny: Path, folder: Path) -> Path:
    path = folder / "other.so"
    shutil.copyfile(tiny, path)
    runtime.sidecar_path(path).write_text(json.dumps(tiny_sidecar(tiny) | {"module_sha256": "0"}))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not empty", "{out} is not empty: give a new folder, or remove this one first"),
        ("a file", "{out} exists and is not a folder: give a new folder name"),
        ("no module", "module {tmp}/none.so does not exist; compile one with 'fgq-tvm compile'"),
        ("bad sidecar", "{tmp}/other.so.json is not an fgq-tvm sidecar (module_sha256 is not"),
        ("no folder", "cannot write in the output folder /proc"),
    ],
)
def test_bundle_refuses(tiny, tmp_path, case, message):
    out, module = tmp_path / "b", tiny
    if case == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "a file":
        out.write_text("mine")
    elif case == "no module":
        module = tmp_path / "none.so"
    elif case == "bad sidecar":
        module = broken_sidecar(tiny, tmp_path)
    elif case == "no folder":
        out = Path("/proc/fgq-tvm-bundle")
    before = sorted(path.name for path in tmp_path.iterdir())
    result = fgq_tvm_cli("bundle", module, "-o", out)
    assert result.returncode == 1
    assert result.stdout == ""
    expected = "fgq-tvm: error: " + message.format(out=out, tmp=tmp_path)
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_bundle_library_function(tiny, tmp_path):
    written = bundle.write_bundle(tiny, tmp_path / "b")
    assert written.folder == tmp_path / "b"
    assert written.size == folder_size(tmp_path / "b")
    assert 3.0 < written.size_mb < 6.0  # the runtime library is most of it
    model = fgq_tvm.load(written.folder / "tiny.so")  # the full install loads a bundle too
    x = np.ones(TINY_SHAPE, np.float32)
    assert model(x).tolist() == [[1.0] * 3] * 2


# --- slow: a compiled CIFAR ResNet-20 in a virtual environment with numpy and tvm-ffi alone ---


@pytest.fixture(scope="module")
def r20(tmp_path_factory) -> Path:
    """A CIFAR ResNet-20 compiled with the quickest settings (random weights, 16 random
    calibration images, default schedules: about 20 s)."""
    module = tmp_path_factory.mktemp("r20") / "r20.so"
    result = fgq_tvm_cli(
        "compile", "cifar_resnet20", "--method", "exact", "--calibration", "max",
        "--batchnorm", "keep", "--reconstruction", "off", "--calib-images", 16,
        "--default-schedules", "-o", module,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return module


@pytest.mark.slow
def test_bundle_runs_with_numpy_and_tvm_ffi_alone(r20, tmp_path):
    written = tmp_path / "written"
    assert fgq_tvm_cli("bundle", r20, "-o", written).returncode == 0
    deployed = shutil.copytree(written, tmp_path / "elsewhere" / "deploy")  # the copy runs
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, env=clean_env())
    venv_python = str(venv / "bin" / "python")
    pip = subprocess.run(
        [venv_python, "-m", "pip", "install", "-q", "-r", deployed / "requirements.txt"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert pip.returncode == 0, pip.stderr
    for name in ("tvm", "torch", "fgq_tvm"):
        found = subprocess.run(
            [venv_python, "-c", f"import importlib.util as u; print(u.find_spec({name!r}))"],
            capture_output=True, text=True, check=True, env=clean_env(), cwd=tmp_path,
        )  # fmt: skip
        assert found.stdout == "None\n", name
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32), np.float32)
    np.save(tmp_path / "x.npy", x)
    run = [deployed / "run.py", "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"]
    result = subprocess.run(
        [venv_python, *run], capture_output=True, text=True, timeout=300, check=False,
        env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("output: [8, 10] float32 -> ")
    expected = fgq_tvm.load(r20)(x)
    assert np.load(tmp_path / "y.npy").tobytes() == expected.tobytes()  # bit for bit
