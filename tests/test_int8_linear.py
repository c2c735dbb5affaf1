"""The int8 matrix product (kernels/int8_linear.py) against its reference, on every path.

Both backends, the C++ one and torch's ops, over hypothesis-chosen shapes, with a tolerance derived from
float32 rounding (cpp) or bf16 activations (torch), never a typed number. The C++ build is also tested the
way CI meets it, in a fresh extension folder from a Python whose venv is not on PATH, and its fallback with
the compiler missing.
"""

import os
import sys

import pytest
import torch
from conftest import int8_activation_bound, rel_l2, run_python
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import gemv, vnni_prefill
from minaf3.kernels import int8_linear as kernel
from minaf3.kernels.int8_linear import int8_linear, int8_linear_reference
from minaf3.kernels.registry import available, override, runs

from minaf3 import ConfigError

FLOAT32_EPS = torch.finfo(torch.float32).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps  # the torch backend rounds activations to bf16
KERNEL_SETTINGS = settings(max_examples=40, deadline=None)
# The C++ kernel takes AVX-512 where the CPU has it ("cpp"); "cpp-avx2" forces its AVX2 code.
KERNEL_PATHS = ["cpp", "cpp-avx2", "torch"]


def random_layer(out_features: int, in_features: int, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    scales = torch.rand(out_features, generator=g) * 0.01 + 1e-4
    b = torch.randn(out_features, generator=g) if bias else None
    return w, scales, b


def error_bound(x, w, scales, bias, rel: float) -> torch.Tensor:
    """|y - y_ref| allowed per element: rel * sum_k |x_k w_nk| (+ |bias|), the scale of rounding errors."""
    size = x.float().abs() @ (w.float().abs() * scales[:, None]).T
    return rel * (size + (0 if bias is None else bias.abs())) + 1e-6


def run_path(path: str, x, w, scales, bias):
    """int8_linear on one of KERNEL_PATHS."""
    if path == "cpp-avx2":
        assert runs("gemv")
        return torch.ops.minaf3_int8.int8_linear(x, w, scales, bias, False)
    return int8_linear(x, w, scales, bias, backend=path)


def vnni_bound(path: str, x, w, scales) -> torch.Tensor | float:
    """What the VNNI prefill product's int8 activations add to the bound where `path` runs it, else 0."""
    rows, width = x.shape[:-1].numel(), x.shape[-1]
    kernels = available()
    runs_vnni = kernels.vnni_prefill and not kernels.gemm and width % vnni_prefill.ALIGN == 0
    if path != "cpp" or rows < kernel.GEMM_MIN_ROWS or not runs_vnni:
        return 0.0
    return int8_activation_bound(x, w.float() * scales[:, None], vnni_prefill.ACTIVATION_GROUP)


def path_tolerance(path: str, in_features: int, rows: int = 1) -> float:
    # float32 sums in another order (cpp) or bf16-rounded activations (torch's small-batch op); from
    # GEMM_MIN_ROWS rows on an AVX-512 BF16 CPU, bf16 tiles (bf16 activations, weights and outputs)
    if path == "cpp" and rows >= kernel.GEMM_MIN_ROWS and available().bf16_prefill and not available().gemm:
        return 2 * BF16_EPS  # (or VNNI's int8 activations: vnni_bound)
    return 2 * BF16_EPS if path == "torch" else in_features * FLOAT32_EPS


@pytest.mark.parametrize("path", KERNEL_PATHS)
@KERNEL_SETTINGS
@given(
    rows=st.integers(1, 12),
    out_features=st.integers(1, 70),
    # below and above one 64-column step, every remainder mod 8 and 16; from 2048 columns the AVX-512 code
    in_features=st.one_of(st.integers(1, 200), st.integers(2040, 2120)),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_matches_reference(path, rows, out_features, in_features, bias, seed):
    w, scales, b = random_layer(out_features, in_features, bias, seed)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed + 1))
    out = run_path(path, x, w, scales, b)
    expected = int8_linear_reference(x, w, scales, b)
    assert out.shape == (rows, out_features) and out.dtype == x.dtype
    assert ((out - expected).abs() <= error_bound(x, w, scales, b, path_tolerance(path, in_features))).all()


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 33, kernel.GEMM_MIN_ROWS + 5])
def test_batch_rows_each_equal_that_row_alone(path, rows):
    """Row blocking (1-4 rows per pass, tiles of weight rows) must not mix rows; width 3584 as in AF3."""
    w, scales, b = random_layer(203, 3584, True, seed=rows)  # 203: chunks of whole blocks, then odd rows
    x = torch.randn(rows, 3584)
    out = run_path(path, x, w, scales, b)
    alone = torch.cat([run_path(path, x[i : i + 1], w, scales, b) for i in range(rows)])
    expected = int8_linear_reference(x, w, scales, b)
    bound = error_bound(x, w, scales, b, path_tolerance(path, 3584, rows)) + vnni_bound(path, x, w, scales)
    assert ((out - expected).abs() <= bound).all()
    assert ((out - alone).abs() <= bound).all()


@pytest.mark.parametrize("path", ["cpp", "cpp-avx2"])
@pytest.mark.parametrize("shape", [(1, 1001, 1000), (3, 517, 4099)])
def test_thread_count_does_not_change_any_bit(path, shape):
    """Threads claim chunks of rows as they go; each row's sum is the same code whichever thread runs it."""
    rows, out_features, in_features = shape  # several chunks, none a whole number of 4-row blocks
    w, scales, b = random_layer(out_features, in_features, True, seed=8)
    x = torch.randn(rows, in_features)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run_path(path, x, w, scales, b)
        torch.set_num_threads(max(2, threads))
        shared = run_path(path, x, w, scales, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)
    expected = int8_linear_reference(x, w, scales, b)
    assert ((shared - expected).abs() <= error_bound(x, w, scales, b, in_features * FLOAT32_EPS)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_dtype_are_kept(dtype):
    w, scales, b = random_layer(24, 48, True, seed=3)
    x = torch.randn(2, 5, 48).to(dtype)
    out = int8_linear(x, w, scales, b.to(dtype))
    assert out.shape == (2, 5, 24) and out.dtype == dtype
    expected = int8_linear_reference(x, w, scales, b)
    assert rel_l2(out, expected) < 2 * BF16_EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_the_blocked_product_where_it_is_wanted(dtype):
    """From GEMM_MIN_ROWS rows (a prompt) the "cpp" backend calls gemm.cpp's int8 operator on CPUs whose
    best vector unit is AVX2, vnni_prefill.cpp's on CPUs with AVX-512 VNNI (widths a multiple of 128), bf16
    tiles on CPUs with AVX-512 BF16, and the streaming loop below that or on other CPUs; every way, the
    product is the reference's within float32 rounding (bf16 rows, or tiles: within bf16 rounding; VNNI:
    within the int8 rounding of the activations)."""
    from torch.profiler import profile

    many = kernel.GEMM_MIN_ROWS
    vnni = {"minaf3_int4::quantize_int8", "minaf3_vnni::int8_gemm"}
    loop, tiles = {"minaf3_int8::int8_linear"}, {"minaf3_tiles::int8_dequantize"}
    off = {"gemm": False, "vnni_prefill": False, "bf16_prefill": False}
    for width in (300, 256):  # VNNI: only the second
        w, scales, b = random_layer(70, width, True, seed=9)
        x = torch.randn(many, width).to(dtype)
        expected = int8_linear_reference(x, w, scales, b).float()
        rel = width * FLOAT32_EPS if dtype == torch.float32 else 2 * BF16_EPS
        bounds = {
            "float32": error_bound(x, w, scales, b, rel),
            "bf16": error_bound(x, w, scales, b, 2 * BF16_EPS),
            "int8": error_bound(x, w, scales, b, rel) + vnni_bound("cpp", x, w, scales),
        }
        cases = [
            ({"gemm": True}, many, {"minaf3_gemm::int8_gemm"}, "float32"),
            ({"gemm": True}, many - 1, loop, "float32"),
            (off, many, loop, "float32"),  # the loop at any count
        ]
        if vnni_prefill.wanted():  # there the VNNI product must build and run
            cases.append((off | {"vnni_prefill": True}, many, vnni if width % 128 == 0 else loop, "int8"))
            cases.append((off | {"vnni_prefill": True}, many - 1, loop, "float32"))
        if torch.cpu._is_avx512_bf16_supported():  # there the tiles must build and run
            cases.append((off | {"bf16_prefill": True}, many, tiles, "bf16"))
            both = off | {"vnni_prefill": True, "bf16_prefill": True}
            cases.append((both, many, vnni if width % 128 == 0 else tiles, "int8"))
        for flags, rows, ops, error in cases:
            with override(**flags), profile() as trace:
                out = int8_linear(x[:rows], w, scales, b)
            calls = {event.key for event in trace.key_averages() if event.key.startswith("minaf3")}
            assert calls == ops, (width, flags, rows, calls)
            allowed = bounds["bf16" if ops == tiles else error][:rows]
            assert out.dtype == dtype and ((out.float() - expected[:rows]).abs() <= allowed).all()


@pytest.mark.parametrize("rows", [3, kernel.GEMM_MIN_ROWS])  # the streaming loop, the blocked product
def test_traced_by_torch_compile_without_graph_breaks(rows):
    w, scales, b = random_layer(16, 32, True, seed=4)
    x = torch.randn(2, rows, 32)  # leading dims: the operators' registered shape functions must keep them
    eager = int8_linear(x, w, scales, b)
    compiled = torch.compile(lambda t: int8_linear(t, w, scales, b), backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), eager)


def test_backend_switch_by_argument_and_environment(monkeypatch):
    calls = []
    torch_path = kernel._torch_int8_linear
    monkeypatch.setattr(kernel, "_torch_int8_linear", lambda *a: calls.append(1) or torch_path(*a))
    w, scales, _ = random_layer(8, 16, False, seed=5)
    x = torch.randn(1, 16)
    int8_linear(x, w, scales)
    assert calls == []  # auto: the C++ kernel builds on this machine
    int8_linear(x, w, scales, backend="torch")
    assert calls == [1]
    monkeypatch.setenv(kernel.BACKEND_ENV, "torch")
    int8_linear(x, w, scales)
    assert calls == [1, 1]
    with pytest.raises(ConfigError, match="MINAF3_INT8_BACKEND='fast'"):
        monkeypatch.setenv(kernel.BACKEND_ENV, "fast")
        int8_linear(x, w, scales)
    with pytest.raises(ConfigError, match="backend='gpu'"):
        int8_linear(x, w, scales, backend="gpu")


def test_input_errors_name_the_mismatch():
    w, scales, b = random_layer(8, 16, True, seed=6)
    x = torch.randn(2, 16)
    with pytest.raises(ConfigError, match=r"input must be float \(\.\.\., 16\)"):
        int8_linear(torch.randn(2, 15), w, scales)
    with pytest.raises(ConfigError, match="weight must be 2-D int8"):
        int8_linear(x, w.float(), scales)
    with pytest.raises(ConfigError, match=r"scales must be float \(8,\)"):
        int8_linear(x, w, scales[:7])
    with pytest.raises(ConfigError, match=r"bias must be \(8,\)"):
        int8_linear(x, w, scales, b[:3])


def test_kernel_is_built_with_openmp():
    """at::parallel_for runs serially in an extension compiled without OpenMP: the kernel must call the
    OpenMP runtime (the entry of `#pragma omp parallel`: GOMP_parallel in GCC's libgomp, __kmpc_fork_call in
    LLVM's libomp) to use torch's threads at all."""
    assert runs("gemv")
    library = [path for path in torch.ops.loaded_libraries if gemv.EXTENSION_NAME in path]
    assert len(library) == 1
    with open(library[0], "rb") as f:
        binary = f.read()
    assert b"GOMP_parallel" in binary or b"__kmpc_fork_call" in binary


CHECK_KERNEL = """
import logging, shutil, torch
logging.basicConfig()
from minaf3.kernels.int8_linear import int8_linear, int8_linear_reference
from minaf3.kernels.registry import runs
x, w, s = torch.randn(3, 40), torch.randint(-127, 128, (9, 40), dtype=torch.int8), torch.rand(9)
err = (int8_linear(x, w, s) - int8_linear_reference(x, w, s)).abs().max().item()
print("loaded", runs("gemv"), "error", err, "ninja", shutil.which("ninja"))
"""


@pytest.mark.slow
def test_cpp_kernel_builds_from_scratch(tmp_path):
    """What CI meets: an empty extension cache and ninja only beside the interpreter, not on PATH."""
    done = run_python(CHECK_KERNEL, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    _, loaded, _, error, _, ninja = done.stdout.split()
    assert loaded == "True" and float(error) < 1e-3, done.stdout + done.stderr
    assert list(tmp_path.rglob("*.so")), "no library was built in the fresh folder"
    venv_ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    if os.path.exists(venv_ninja):  # pip's ninja (CI installs it with the test extras) was put on PATH
        assert ninja == venv_ninja


def test_missing_compiler_falls_back_with_a_note(tmp_path):
    done = run_python(CHECK_KERNEL, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "False"
    assert float(done.stdout.split()[3]) < 1e-3  # 40 columns: torch's dequantizing path, in float32
    assert "decode matrix-vector kernel: building int8_gemv.cpp failed" in done.stderr
    assert "using torch's ops instead" in done.stderr


@pytest.mark.slow
def test_compiler_without_openmp_builds_a_one_thread_kernel(tmp_path):
    compiler = tmp_path / "c++-without-openmp"
    compiler.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "error: no OpenMP" >&2; exit 1; }; done\n'
        'exec c++ "$@"\n'
    )
    compiler.chmod(0o755)
    done = run_python(CHECK_KERNEL, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(compiler))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "True" and float(done.stdout.split()[3]) < 1e-3, done.stdout
    assert (
        "decode matrix-vector kernel: built without OpenMP" in done.stderr
        and "runs on one thread" in done.stderr
    )


def test_cpp_backend_refuses_tensors_it_cannot_run():
    w, scales, _ = random_layer(4, 16, False, seed=7)
    with override(gemv=False), pytest.raises(ConfigError, match="int8 backend 'cpp' cannot run"):
        int8_linear(torch.randn(1, 16), w, scales, backend="cpp")
