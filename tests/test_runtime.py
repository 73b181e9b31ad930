"""Tests of fgq_tvm.runtime on a tiny hand-built module in the fgq-tvm format.

The module computes the per-channel mean of a [2, 3, 4, 4] batch, so its "logits" are known
exactly; it is built with TVM in well under a second. The end-to-end tests with a real
compiled network are in test_cli.py.
"""

import _ctypes
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SHAPE as SHAPE
from helpers import tiny_sidecar, write_tiny_module

import fgq_tvm
from fgq_tvm import cpu_features, gpu_runtime, runtime
from fgq_tvm.errors import FGQError
from fgq_tvm.threads import cores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_module(tmp_path_factory.mktemp("tiny") / "tiny.so")


@pytest.fixture
def copy_of(tmp_path):
    """Copy a file to ``tmp_path / name`` with the tiny module's sidecar beside it (its hash
    that of the copy)."""

    def copy(data: bytes, name: str = "module.so") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        runtime.sidecar_path(path).write_text(json.dumps(tiny_sidecar(path)))
        return path

    return copy


def batch(size: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(size).standard_normal((size, *SHAPE[1:])).astype(dtype)


def test_load_and_call(tiny):
    model = fgq_tvm.load(tiny)
    x = batch(2)
    np.testing.assert_allclose(model(x), x.mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)
    assert model.input_shape == SHAPE
    assert model.input_dtype == np.float32
    assert model.info == tiny_sidecar(tiny)


def test_batches_run_in_slices_of_the_compiled_batch(tiny):
    x = batch(6)
    np.testing.assert_allclose(fgq_tvm.load(tiny)(x), x.mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)


def test_non_contiguous_input(tiny):
    x = np.ascontiguousarray(batch(2).transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not x.flags.c_contiguous
    np.testing.assert_allclose(fgq_tvm.load(tiny)(x), x.mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)


def test_operator_times_cover_every_call_of_each_inference(tiny):
    model = fgq_tvm.load(tiny)
    times = model.operator_times(batch(2), repeats=3)
    operators = [name for name in times if not name.startswith("vm.builtin.")]
    assert operators == ["mean"]
    assert all(len(runs) == 3 and min(runs) > 0 for runs in times.values())
    with pytest.raises(FGQError, match="profile one batch of 2, not 4 images"):
        model.operator_times(batch(4))
    np.testing.assert_allclose(model(batch(2)), batch(2).mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)


def test_a_dlpack_tensor_on_the_device_is_read_in_place(tiny):
    torch = pytest.importorskip("torch")
    model, x = fgq_tvm.load(tiny), batch(4)
    tensor = torch.tensor(x)  # PyTorch's allocations are aligned as TVM's
    np.testing.assert_array_equal(model(tensor), model(x))
    with pytest.raises(FGQError, match="cannot be read in place .*; pass a contiguous tensor"):
        model(tensor.transpose(2, 3))
    with pytest.raises(FGQError, match="expected float32 input, got float64"):
        model(tensor.double())
    with pytest.raises(FGQError, match="expected a NumPy array or a DLPack tensor, got list"):
        model(x.tolist())


def test_a_tensor_on_another_device_is_refused(tiny):
    model = fgq_tvm.load(tiny)
    with pytest.raises(FGQError, match="the input tensor is on GPU 1, and this module runs on the"):
        model._check_input(SHAPE, np.float32, (gpu_runtime.CUDA_DEVICE_TYPE, 1))


@pytest.mark.parametrize(
    "x", [batch(3), batch(2)[:, :, :3], batch(2)[0], np.zeros((0, 3, 4, 4), np.float32)]
)
def test_wrong_shape(tiny, x):
    with pytest.raises(FGQError, match=r"expected input of shape \[N, 3, 4, 4\] with N a multiple"):
        fgq_tvm.load(tiny)(x)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.uint8])
def test_wrong_dtype(tiny, dtype):
    with pytest.raises(FGQError, match=f"expected float32 input, got {np.dtype(dtype)}; convert"):
        fgq_tvm.load(tiny)(batch(2, dtype))


@pytest.mark.parametrize(
    ("value", "where"),
    [(np.nan, "[1, 2, 3, 0]"), (np.inf, "[1, 2, 3, 0]"), (-np.inf, "[1, 2, 3, 0]")],
)
def test_non_finite_input_is_refused(tiny, value, where):
    x = batch(4)
    x[1, 2, 3, 0] = x[3, 0, 0, 1] = value
    message = (
        f"input has 2 non-finite values (NaN or infinity), the first at {where}; fix the "
        "input, or skip this check with check_finite=False (fgq-tvm run --allow-nonfinite)"
    )
    with pytest.raises(FGQError, match="^" + re.escape(message) + "$"):
        fgq_tvm.load(tiny)(x)


def test_non_finite_check_can_be_skipped(tiny):
    x = batch(2)
    x[0, 1] = np.nan
    logits = fgq_tvm.load(tiny)(x, check_finite=False)
    assert np.isnan(logits[0, 1]) and np.isfinite(np.delete(logits.ravel(), 1)).all()


def test_huge_finite_input_runs(tiny):
    x = np.full((2, *SHAPE[1:]), 1e30, np.float32)
    np.testing.assert_allclose(fgq_tvm.load(tiny)(x), np.full((2, 3), 1e30), rtol=1e-6)


def test_missing_module(tmp_path):
    with pytest.raises(FGQError, match="does not exist"):
        fgq_tvm.load(tmp_path / "none.so")


def test_missing_sidecar(tiny, tmp_path):
    path = tmp_path / "bare.so"
    path.write_bytes(tiny.read_bytes())
    with pytest.raises(FGQError, match="was not written by fgq-tvm compile or its .json"):
        fgq_tvm.load(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{not json", "cannot read"), ("[1, 2]", "not a JSON object")],
)
def test_unreadable_sidecar(tiny, copy_of, text, problem):
    path = copy_of(tiny.read_bytes())
    runtime.sidecar_path(path).write_text(text)
    with pytest.raises(FGQError, match=problem):
        fgq_tvm.load(path)


CPU_OPTION = json.dumps({"kind": "llvm", "mcpu": "skylake", "frobnicate": 1})


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ({"format": "other/2"}, r"not an fgq-tvm sidecar \(format 'other/2'"),
        ({"format": "fgq-tvm-module/2"}, r"written by another version of fgq-tvm .*; recompile"),
        ({"input": {"shape": [2, 3, 4], "dtype": "float32"}}, "shape"),
        ({"input": {"shape": list(SHAPE), "dtype": "int8"}}, "dtype"),
        ({"module_sha256": None}, "module_sha256 is not a SHA-256 digest"),
        ({"module_sha256": "ab" * 16}, "module_sha256 is not a SHA-256 digest"),
        ({"target": None}, "target is not a string"),
        ({"target": "llvm -mcpu=skylake"}, r"target is not a JSON object \(Expecting value"),
        ({"target": json.dumps(["llvm"])}, "target is not a JSON object"),
        (
            {"target": CPU_OPTION},
            r"target is not one TVM accepts \(Unknown config option 'frobnicate'\)",
        ),
        ({"target": json.dumps({"kind": "llvmx"})}, r"target is not for a CPU or an NVIDIA GPU"),
        ({"target": json.dumps({"mcpu": "skylake"})}, r"CPU or an NVIDIA GPU \(kind None"),
        ({"target": json.dumps({"kind": "cuda", "arch": "sm_90"})}, "without its arch and host"),
        ({"target": json.dumps({"kind": "cuda", "mattr": []})}, "Unknown config option 'mattr'"),
        (
            {"target": json.dumps({"kind": "cuda", "arch": "sm_90", "host": {"kind": "cuda"}})},
            r"not for a CPU or an NVIDIA GPU \(kind 'cuda'",
        ),
        (
            {"target": json.dumps({"kind": "llvm", "mcpu": 5})},
            r"target is not one TVM accepts \(Option 'mcpu': expected type 'str' but got 'int'\)",
        ),
        (
            {"target": json.dumps({"kind": "llvm", "mattr": "+avx2"})},
            r"\(Option 'mattr': expected type 'Array<str>' but got 'str'\)",
        ),
        ({"target": json.dumps({"kind": "llvm", "mcpu": "nonexistent"})}, "CPU 'nonexistent'"),
    ],
)
@pytest.mark.parametrize("flags", [{"sse4_1", "avx2"}, None])
def test_bad_sidecar(tiny, copy_of, monkeypatch, entries, problem, flags):
    # flags None: a machine without /proc/cpuinfo, where the CPU check is skipped
    monkeypatch.setattr(cpu_features, "host_flags", lambda: flags)
    path = copy_of(tiny.read_bytes())
    runtime.sidecar_path(path).write_text(json.dumps({**tiny_sidecar(path), **entries}))
    with pytest.raises(FGQError, match=problem) as error:
        fgq_tvm.load(path)
    assert len(str(error.value).splitlines()) == 1


def test_target_options_are_tvms():
    # the runtime checks a sidecar's target without TVM, against TVM's options of each kind
    from tvm.target import TargetKind

    assert dict(TargetKind.options_from_name("llvm")) == runtime.LLVM_TARGET_OPTIONS
    assert dict(TargetKind.options_from_name("cuda")) == gpu_runtime.CUDA_TARGET_OPTIONS


def test_sidecar_of_another_module_is_refused(tiny, copy_of):
    path = copy_of(tiny.read_bytes())
    other = tiny_sidecar(path) | {"module_sha256": hashlib.sha256(b"another module").hexdigest()}
    runtime.sidecar_path(path).write_text(json.dumps(other))
    message = (
        f"module {path} does not match its sidecar (written by another compile?): compile it again"
    )
    with pytest.raises(FGQError, match="^" + re.escape(message) + "$"):
        fgq_tvm.load(path)


def test_module_digest(tmp_path):
    path = tmp_path / "m.so"
    path.write_bytes(b"x" * 3_000_000)
    assert runtime.module_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n - 10, lambda n: 40, lambda n: 100])
def test_truncated_module(tiny, copy_of, keep):
    data = tiny.read_bytes()
    path = copy_of(data[: keep(len(data))])
    with pytest.raises(FGQError, match="not a loadable fgq-tvm module .the file is truncated"):
        fgq_tvm.load(path)


def test_not_an_elf_file(copy_of):
    path = copy_of(np.random.default_rng(0).bytes(5000))
    with pytest.raises(FGQError, match="not a loadable fgq-tvm module .not an ELF"):
        fgq_tvm.load(path)


def test_foreign_shared_library(copy_of):
    foreign = Path(_ctypes.__file__)
    assert foreign.suffix == ".so"
    path = copy_of(foreign.read_bytes())
    with pytest.raises(FGQError, match="not a loadable fgq-tvm module .* recompile it"):
        fgq_tvm.load(path)


def test_module_for_a_cpu_with_more_extensions_is_refused(tiny, copy_of, monkeypatch):
    path = copy_of(tiny.read_bytes())
    cascadelake = json.dumps({"kind": "llvm", "mcpu": "cascadelake"})
    runtime.sidecar_path(path).write_text(json.dumps({**tiny_sidecar(path), "target": cascadelake}))
    monkeypatch.setattr(cpu_features, "host_flags", lambda: {"sse4_1", "sse4_2", "avx", "avx2"})
    with pytest.raises(FGQError, match="compiled for another CPU .* avx512vnni.* recompile it"):
        fgq_tvm.load(path)


def test_a_module_with_amx_layers_asks_linux_for_the_tile_state(tiny, copy_of, monkeypatch):
    path = copy_of(tiny.read_bytes())
    layers = [{"name": "conv", "core": "int8-amx"}]
    runtime.sidecar_path(path).write_text(json.dumps({**tiny_sidecar(path), "layers": layers}))
    asked = []
    monkeypatch.setattr(cpu_features, "request_amx_tile_data", lambda: asked.append(True))
    assert fgq_tvm.load(path)(batch(2)).shape == (2, 3) and asked == [True]

    def refused():
        raise OSError(errno.EINVAL, "arch_prctl(ARCH_REQ_XCOMP_PERM): Invalid argument")

    monkeypatch.setattr(cpu_features, "request_amx_tile_data", refused)
    with pytest.raises(FGQError, match="runs AMX kernels and Linux refused") as error:
        fgq_tvm.load(path)
    assert len(str(error.value).splitlines()) == 1 and "-mattr=-amx-tile" in str(error.value)


def test_module_for_this_cpu_loads(tiny, copy_of):
    from fgq_tvm.target import host_target, parse_target

    path = copy_of(tiny.read_bytes())
    host = str(parse_target(host_target()))
    runtime.sidecar_path(path).write_text(json.dumps({**tiny_sidecar(path), "target": host}))
    assert fgq_tvm.load(path)(batch(2)).shape == (2, 3)


def test_sidecar_sits_beside_the_module():
    assert runtime.sidecar_path("a/m.so") == Path("a/m.so.json")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_import_is_light():
    result = run_python(
        "import sys, fgq_tvm\n"
        "heavy = {'torch', 'tvm', 'fgq_tvm.runtime'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    assert result.returncode == 0, result.stderr


def test_runs_without_torch(tiny):
    # tvm_ffi imports torch opportunistically when it is installed; blocking it simulates a
    # machine with only the TVM runtime and NumPy, and any import of torch fails loudly.
    result = run_python(
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np, fgq_tvm\n"
        f"model = fgq_tvm.load({str(tiny)!r})\n"
        f"print(model(np.ones({SHAPE}, np.float32)).tolist())\n"
        "assert not [m for m in sys.modules if m.startswith(('torch.', 'torchvision'))]\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[1.0] * 3] * 2


def cores_of(cpus: set[int]) -> int:
    """How many cores the logical CPUs ``cpus`` span (hyperthreads of one core count once)."""
    topology = "/sys/devices/system/cpu/cpu{}/topology/thread_siblings_list"
    try:
        return len({Path(topology.format(cpu)).read_text() for cpu in cpus})
    except OSError:
        return len(cpus)


def load_in_fresh_process(module: Path, **env: str) -> dict:
    """Load ``module`` in a new process whose environment has no thread count but ``env``, run
    it, and say what it runs with: TVM's own count of its pool's threads included."""
    code = (
        "import json, os, numpy as np, tvm, fgq_tvm\n"
        "cpus = os.sched_getaffinity(0)\n"
        f"model = fgq_tvm.load({str(module)!r})\n"
        f"model(np.ones({SHAPE}, np.float32))\n"
        "print(json.dumps({'threads': model.threads, 'reason': model.threads_reason,\n"
        "    'tvm': tvm.get_global_func('runtime.NumThreads')(), 'cpus': sorted(cpus),\n"
        "    'cpus_after': sorted(os.sched_getaffinity(0))}))\n"
    )
    unset = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")
    environ = {key: value for key, value in os.environ.items() if key not in unset}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_threads_default_to_the_cores_this_process_may_use(tiny):
    # TVM's own default is half the logical CPUs: 1 of 2 vCPUs, 1.5 to 1.8 times slower
    seen = load_in_fresh_process(tiny, TVM_NUM_THREADS="")  # empty: unset
    count, cpus = cores_of(set(seen["cpus"])), len(seen["cpus"])
    assert seen["threads"] == seen["tvm"] == count
    shared = f" ({cpus} CPUs, hyperthreads counted once)" if count < cpus else ""
    assert seen["reason"] == (
        f"{count} thread{'s' if count > 1 else ''}: one per CPU core this process may use"
        f"{shared}; set TVM_NUM_THREADS to change"
    )
    assert seen["cpus_after"] == seen["cpus"]  # TVM's pool leaves the caller's CPUs alone


def test_threads_follow_the_cpus_the_process_may_use(tiny):
    cpu = min(os.sched_getaffinity(0))
    result = run_python(
        "import os\nfor name in ('TVM_NUM_THREADS', 'OMP_NUM_THREADS'):\n"
        "    os.environ.pop(name, None)\n"
        f"os.sched_setaffinity(0, {{{cpu}}})  # as taskset -c {cpu} would\n"
        f"import fgq_tvm\nmodel = fgq_tvm.load({str(tiny)!r})\n"
        "print(model.threads, *os.sched_getaffinity(0))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"1 {cpu}\n"


def test_user_setting_of_threads_wins(tiny):
    seen = load_in_fresh_process(tiny, TVM_NUM_THREADS="1")
    assert (seen["threads"], seen["tvm"]) == (1, 1)
    assert seen["reason"] == "1 thread: TVM_NUM_THREADS=1 in the environment"
    seen = load_in_fresh_process(tiny, OMP_NUM_THREADS="3")
    assert (seen["threads"], seen["tvm"]) == (3, 3)
    assert seen["reason"] == "3 threads: OMP_NUM_THREADS=3 in the environment"


def in_new_thread(function):
    """Call ``function`` in a new thread (TVM keeps a thread pool per calling thread)."""
    outcome = {}

    def call():
        try:
            outcome["result"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_threads_argument_wins(tiny, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    pool_threads = tvm_pool_threads()

    def load_and_run():
        model = fgq_tvm.load(tiny, threads=2)
        model(batch(2))
        return model.threads, model.threads_reason, pool_threads()

    assert in_new_thread(load_and_run) == (2, "2 threads: threads=2 given to load", 2)


def tvm_pool_threads():
    import tvm

    return tvm.get_global_func("runtime.NumThreads")


def test_each_model_runs_with_its_threads_in_one_thread(tiny):
    pool_threads = tvm_pool_threads()

    def alternate():
        two, one = fgq_tvm.load(tiny, threads=2), fgq_tvm.load(tiny, threads=1)
        seen = []
        for model in (two, one, two, one):
            expected = batch(2).mean(axis=(2, 3))
            np.testing.assert_allclose(model(batch(2)), expected, rtol=1e-6, atol=1e-6)
            seen.append(pool_threads())
        return seen

    assert in_new_thread(alternate) == [2, 1, 2, 1]


def test_a_thread_pool_that_cannot_grow_is_reported(tiny):
    def grow():
        fgq_tvm.load(tiny, threads=1)
        model = fgq_tvm.load(tiny, threads=3)
        return model.threads, model.threads_reason

    assert in_new_thread(grow) == (
        1,
        "1 of the 3 threads asked (threads=3 given to load): TVM's thread pool of this thread "
        "was made smaller and cannot grow; load it in another thread",
    )


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "2 threads"])
def test_bad_thread_variable(tiny, monkeypatch, value):
    monkeypatch.setenv("TVM_NUM_THREADS", value)
    message = (
        f"TVM_NUM_THREADS={value!r} is not a number of threads: give a positive integer such as "
        "2, or unset it to run one thread per CPU core"
    )
    with pytest.raises(FGQError, match="^" + re.escape(message) + "$"):
        fgq_tvm.load(tiny)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "many"])
def test_bad_threads_argument(tiny, value):
    message = f"threads={value!r} is not a number of threads: give a positive integer such as 2"
    with pytest.raises(FGQError, match="^" + re.escape(message) + "$"):
        fgq_tvm.load(tiny, threads=value)


def test_run_says_how_many_threads(tiny, tmp_path):
    np.save(tmp_path / "x.npy", batch(2))
    result = fgq_tvm_cli("run", tiny, "--input", tmp_path / "x.npy", TVM_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "fgq-tvm: 1 thread: TVM_NUM_THREADS=1 in the environment\n"
    result = fgq_tvm_cli("run", tiny, "--input", tmp_path / "x.npy", TVM_NUM_THREADS="x")
    assert result.returncode == 1
    assert result.stderr == (
        "fgq-tvm: error: TVM_NUM_THREADS='x' is not a number of threads: give a positive integer "
        "such as 2, or unset it to run one thread per CPU core\n"
    )


def fgq_tvm_cli(*args: object, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FGQ_TVM_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "fgq_tvm", *map(str, args)],
        capture_output=True,
        text=True,
        env={**environ, **env},
        timeout=120,
        check=False,
    )


def test_cores_count_hyperthreads_once():
    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4-5", 5: "4-5", 6: None, 7: "bad"}
    assert cores(list(siblings), siblings.get) == [[0, 2], [1, 3], [4, 5], [6], [7]]
    assert cores([2, 3], siblings.get) == [[2], [3]]


def test_a_forked_child_runs_the_forking_thread_serially(tiny):
    # A fork copies only the calling thread: the child's copy of its TVM pool has no threads,
    # and a parallel loop would wait for them for ever. The parent keeps its threads.
    result = run_python(
        "import os, numpy as np, tvm, fgq_tvm\n"
        "pool_threads = tvm.get_global_func('runtime.NumThreads')\n"
        f"model = fgq_tvm.load({str(tiny)!r}, threads=2)\n"
        f"x = np.ones({SHAPE}, np.float32)\n"
        "model(x)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if model(x).tolist() == [[1.0] * 3] * 2 and pool_threads() == 1 else 3)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), pool_threads())\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0 2\n"
