"""The CUDA backend (csrc/cuda, extension lora_kernels._C_cuda) with and without a GPU.

* csrc/philox.h compiled by nvcc (``nvcc -x cu``, host and device code) gives
  Random123's known answers and the reference's mask lanes; skipped without
  nvcc.
* The kernels of csrc/cuda/kernels run on the host under an emulation of the
  CUDA thread model (csrc/cuda/emulation: each thread of a block is a host
  thread, __syncthreads a barrier), compiled with the host C++ compiler:
  dropout bit-identical to the CPU backend, every product against the
  reference in float64, odd shapes that straddle tiles, split reductions.
  Skipped without a C++20 compiler.
* The built extension registers a CUDA kernel under lora_kernels (and lora_kernels_cuda) for
  every op, with lora_kernels_cpu's schema; skipped when it is not built.
* ``gpu`` tests: backend "cuda" against the reference on a CUDA device, as
  tests/test_device_backends.py does for triton (masks bit-identical to the
  CPU backend, forward, every gradient, merge, embedding); skipped without
  a GPU or without the extension.
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels import reference as R
from lora_kernels.backends.forward import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
TORCH_INCLUDE = os.path.join(os.path.dirname(torch.__file__), "include")
SEED = torch.tensor(0x0123_4567_89AB_CDEF, dtype=torch.int64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cpu_dropout(x, seed, p):
    """The CPU backend's dropout (the reference's where the extension is missing)."""
    with lk.use_backend("auto"):
        return torch.ops.lora_kernels.dropout(x.cpu(), seed.cpu(), p)


# ---------------------------------------------------------------------------
# csrc/philox.h through nvcc
# ---------------------------------------------------------------------------

PHILOX_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "philox.h"
using namespace lora_kernels::philox;

// The same functions in device code (compiled for the target, not launched).
__global__ void lanes_kernel(uint64_t seed, int64_t cols, uint32_t* out) {
  const int64_t j = threadIdx.x;
  out[j] = lane(mask_words(seed, counter_of(blockIdx.x, j, words_per_row(cols))), lane_of(j));
}

int main(int argc, char** argv) {
  // philox4x32_10 of (key, counter) pairs: key lo, key hi, c0..c3 per line of stdin.
  unsigned k0, k1, c[4];
  int n = atoi(argv[1]);
  for (int i = 0; i < n && scanf("%u %u %u %u %u %u", &k0, &k1, c, c + 1, c + 2, c + 3) == 6; ++i) {
    const Out4 o = philox4x32_10(c[0], c[1], c[2], c[3], k0, k1);
    printf("%u %u %u %u\n", o.v[0], o.v[1], o.v[2], o.v[3]);
  }
  // The 16-bit lanes of every element of a rows x cols matrix.
  const uint64_t seed = strtoull(argv[2], nullptr, 0);
  const long rows = atol(argv[3]), cols = atol(argv[4]);
  const int64_t words = words_per_row(cols);
  for (long i = 0; i < rows; ++i)
    for (long j = 0; j < cols; ++j)
      printf("%u%c", lane(mask_words(seed, counter_of(i, j, words)), lane_of(j)),
             j + 1 < cols ? ' ' : '\n');
  // Threshold and keep scale of each p.
  for (int a = 5; a < argc; ++a) {
    const uint32_t t = dropout_threshold(atof(argv[a]));
    printf("%u %.17g\n", t, dropout_keep_scale(t));
  }
  return 0;
}
"""

KNOWN_ANSWERS = [  # Random123's kat_vectors for philox4x32_10: key, counter, output
    (0, (0, 0, 0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    (0xffffffffffffffff, (0xffffffff,) * 4, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    (0x299f31d0a4093822, (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


@pytest.fixture(scope="module")
def philox_program(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    work = tmp_path_factory.mktemp("philox")
    src = work / "philox_check.cu"
    src.write_text(PHILOX_PROGRAM)
    exe = work / "philox_check"
    subprocess.run([nvcc, "-x", "cu", "-std=c++17", "-arch=sm_90", "-I", CSRC, str(src),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    return str(exe)


def test_philox_header_under_nvcc_gives_the_known_answers_and_lanes(philox_program):
    extra = [(0xF123_4567_89AB_CDEF, (7, 0xFFFFFFFF, 3, 0x80000000))]
    cases = [(k, c) for k, c, _ in KNOWN_ANSWERS] + extra
    stdin = "".join(f"{k & 0xFFFFFFFF} {k >> 32} {' '.join(map(str, c))}\n" for k, c in cases)
    seed, rows, cols, ps = 0xF123_4567_89AB_CDEF, 5, 21, [0.05, 0.5, 0.9, 1.0, 1e-6]
    out = subprocess.run([philox_program, str(len(cases)), str(seed), str(rows), str(cols)]
                         + [repr(p) for p in ps], input=stdin, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    words = [tuple(int(v) for v in line.split()) for line in out[:len(cases)]]
    assert words[:3] == [expected for _, _, expected in KNOWN_ANSWERS]
    ref = R.philox4x32(extra[0][0], *(torch.tensor([c]) for c in extra[0][1]))
    assert words[3] == tuple(int(o) for o in ref)
    lanes = [[int(v) for v in line.split()] for line in out[len(cases):len(cases) + rows]]
    assert lanes == R.dropout_lanes(rows, cols, seed).tolist()
    for line, p in zip(out[len(cases) + rows:], ps):
        t, scale = line.split()
        assert int(t) == R.dropout_threshold(p) and float(scale) == R.dropout_keep_scale(p)


# ---------------------------------------------------------------------------
# The kernels under the host emulation of the CUDA thread model
# ---------------------------------------------------------------------------

_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_I64, _F64, _INT, _P = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "lk_emu_dropout": [_INT, _P, _P, _I64, _I64, _P, _F64],
    "lk_emu_lowrank_in": [_INT, _P, _I64, _P, _P, _I64, _I64, _I64, _P, _F64, _I64],
    "lk_emu_rank_update": [_INT, _INT, _P, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _P, _P,
                           _I64, _I64, _P, _INT, _I64, _I64, _I64, _F64, _P, _F64],
    "lk_emu_rank_r_grads": [_INT, _P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _F64, _I64],
    "lk_emu_lowrank_da": [_INT, _P, _I64, _P, _P, _I64, _I64, _I64, _P, _F64, _I64],
}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no host C++ compiler")
    lib = tmp_path_factory.mktemp("emulation") / "lk_emulation.so"
    src = os.path.join(CSRC, "cuda", "emulation", "kernels_host.cpp")
    run = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC",
                          "-Wno-unknown-pragmas", "-DLK_CUDA_EMULATION", "-I", CSRC,
                          "-I", TORCH_INCLUDE, src, "-o", str(lib)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        if "c++20" in run.stderr or "barrier" in run.stderr:
            pytest.skip(f"the host compiler lacks C++20: {run.stderr[-300:]}")
        raise AssertionError(f"emulation build failed:\n{run.stderr[-4000:]}")
    handle = ctypes.CDLL(str(lib))
    for name, args in _SIGNATURES.items():
        getattr(handle, name).argtypes = args
        getattr(handle, name).restype = _INT
    return handle


def _ptr(t):
    return None if t is None else t.data_ptr()


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(T, K, dtype, pad, gen):
    """A T × K matrix of dtype whose rows are `pad` elements apart beyond K."""
    return torch.randn(T, K + pad, generator=gen, dtype=torch.float64).to(dtype)[:, :K]


def _mask64(T, K, p):
    return R.dropout_mask((T, K), SEED, p, torch.float64) if p > 0 else torch.ones(T, K).double()


def _assert_close(got, ref, dtype, what, half_tol=None):
    """Max error relative to the reference's magnitude: float64 and fp32
    accumulation are near exact here; half outputs round once."""
    tol = {torch.float64: 1e-11, torch.float32: 3e-5}.get(got.dtype, half_tol)
    err = (got.double() - ref).abs().max().item() if got.numel() else 0.0
    scale = 1.0 + (ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{what} {dtype}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 37), (67, 203), (5, 64), (2, 0, 9)], ids=str)
def test_emulated_dropout_is_bit_identical_to_the_cpu_backend(emu, shape):
    for dtype in DTYPES:
        for p in (0.05, 0.5, 1.0):
            x = torch.randn(shape, dtype=torch.float64).to(dtype)
            out = torch.empty_like(x)
            cols = shape[-1]
            rows = x.numel() // cols if cols else 0
            assert emu.lk_emu_dropout(_DT[dtype], _ptr(x), _ptr(out), rows, cols, _ptr(SEED),
                                      p) == 0
            assert torch.equal(out, _cpu_dropout(x, SEED, p)), (dtype, p)
            if dtype != torch.bfloat16:
                assert torch.equal(out, R.dropout(x, SEED, p)), (dtype, p)


# tokens, in, R, p, target blocks (small: split the in features), row padding
@pytest.mark.parametrize("case", [(1, 1, 1, 0.0, 1, 0), (7, 37, 9, 0.3, 4, 3),
                                  (130, 100, 24, 0.1, 1, 0), (200, 136, 64, 0.5, 1000, 8),
                                  (33, 8, 100, 0.9, 3, 0)], ids=str)
def test_emulated_lowrank_in(emu, case):
    """S = dropout(x)·Aᵀ with the mask regenerated per row: rank blocks of 8 to
    64 (and two for R = 100), tiles of in features split across blocks."""
    T, K, Rk, p, blocks, pad = case
    gen = torch.Generator().manual_seed(T * 31 + K)
    for dtype in DTYPES:
        x = _rows(T, K, dtype, pad, gen)
        A = torch.randn(Rk, K, generator=gen, dtype=_acc(dtype))
        S = torch.full((T, Rk), float("nan"), dtype=_acc(dtype))
        assert emu.lk_emu_lowrank_in(_DT[dtype], _ptr(x), x.stride(0), _ptr(A), _ptr(S), T, K,
                                     Rk, _ptr(SEED), p, blocks) == 0
        _assert_close(S, (x.double() * _mask64(T, K, p)) @ A.double().t(), dtype, "S")


@pytest.mark.parametrize("T,N,Rk", [(1, 1, 1), (70, 130, 16), (64, 64, 17), (130, 9, 40)],
                         ids=str)
def test_emulated_rank_update(emu, T, N, Rk):
    """out = base + m ⊙ alpha·L·Rmᵀ in its four uses: the forward's y (bias),
    the backward's masked dx (A read through strides), the embedding's
    gathered rows, and merge_'s in-place update of a transposed W."""
    gen = torch.Generator().manual_seed(T + N + Rk)
    half_tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    for dtype in DTYPES:
        acc = _acc(dtype)
        L = torch.randn(T, Rk, generator=gen, dtype=acc)
        Rm = torch.randn(N, Rk, generator=gen, dtype=acc)

        def update(out, o_st, o_sn, L=L, l_st=Rk, l_sk=1, Rm=Rm, r_sn=Rk, r_sk=1, bias=None,
                   rows=None, idx=None, accumulate=0, alpha=1.0, p=0.0, acc_code=None, T=T, N=N):
            assert emu.lk_emu_rank_update(
                _DT[dtype], _DT[acc] if acc_code is None else acc_code, _ptr(L), l_st, l_sk,
                _ptr(Rm), r_sn, r_sk, _ptr(out), o_st, o_sn, _ptr(bias), _ptr(rows),
                rows.stride(0) if rows is not None else 0, rows.shape[0] if rows is not None else 0,
                _ptr(idx), accumulate, T, N, Rk, alpha, _ptr(SEED), p) == 0

        bias = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.full((T, N), float("nan"), dtype=dtype)
        update(y, N, 1, bias=bias, alpha=1.3)
        _assert_close(y, bias.double() + 1.3 * L.double() @ Rm.double().t(), dtype, "y",
                      half_tol[dtype] if dtype in half_tol else None)

        A = torch.randn(Rk, N, generator=gen, dtype=acc)
        dx = torch.full((T, N), float("nan"), dtype=dtype)
        update(dx, N, 1, Rm=A, r_sn=1, r_sk=N, p=0.3)
        m = _mask64(T, N, 0.3)
        ref = m * (L.double() @ A.double())
        _assert_close(dx, ref, dtype, "dx", half_tol.get(dtype))
        assert torch.equal(dx == 0, (m == 0) | (ref == 0))

        W = _rows(11, N, dtype, 2, gen)
        idx = torch.randint(0, 11, (T,), generator=gen)
        emb = torch.full((T, N), float("nan"), dtype=dtype)
        update(emb, N, 1, rows=W, idx=idx, alpha=0.7)
        _assert_close(emb, W.double()[idx] + 0.7 * L.double() @ Rm.double().t(), dtype, "emb",
                      half_tol.get(dtype))

        # merge_: W (T × N) stored transposed, += alpha·L·Rmᵀ in place, with L
        # read through strides from its transpose (as merge_ reads A for a
        # fan_in_fan_out weight), in the op's compute dtype and in float64.
        for acc_code, acc_dt in ((None, acc), (3, torch.float64)):
            Wt = torch.randn(N, T, generator=gen, dtype=torch.float64).to(dtype)  # W = Wt.t()
            W0 = Wt.t().double().clone()
            Lt, Rx = L.t().contiguous().to(acc_dt), Rm.to(acc_dt)
            update(Wt, 1, T, L=Lt, l_st=1, l_sk=T, Rm=Rx, accumulate=1, alpha=-0.4,
                   acc_code=acc_code)
            _assert_close(Wt.t(), W0 - 0.4 * Lt.double().t() @ Rx.double().t(), dtype, "merge",
                          half_tol.get(dtype))


# tokens, N (g's columns), R, target blocks (column chunks × row slots), row padding
@pytest.mark.parametrize("case", [(1, 3, 1, 1, 0), (65, 64, 8, 8, 0), (200, 129, 16, 64, 3),
                                  (70, 300, 20, 4, 0), (130, 130, 40, 2, 0)], ids=str)
def test_emulated_rank_r_grads(emu, case):
    """dS = scaling·g·Bm and dB = scaling·gᵀ·S from one pass over g: partials
    over column chunks and row slots, each asked for alone or both."""
    T, N, Rk, blocks, pad = case
    gen = torch.Generator().manual_seed(T * 7 + N)
    for dtype in DTYPES:
        acc = _acc(dtype)
        g = _rows(T, N, dtype, pad, gen)
        Bm = torch.randn(N, Rk, generator=gen, dtype=acc)
        S = torch.randn(T, Rk, generator=gen, dtype=acc)
        for want_ds, want_db in ((True, True), (True, False), (False, True)):
            dS = torch.full((T, Rk), float("nan"), dtype=acc) if want_ds else None
            dB = torch.full((N, Rk), float("nan"), dtype=acc) if want_db else None
            assert emu.lk_emu_rank_r_grads(_DT[dtype], _ptr(g), g.stride(0), _ptr(Bm), _ptr(S),
                                           _ptr(dS), _ptr(dB), T, N, Rk, 1.7, blocks) == 0
            if want_ds:
                _assert_close(dS, 1.7 * g.double() @ Bm.double(), dtype, "dS")
            if want_db:
                _assert_close(dB, 1.7 * g.double().t() @ S.double(), dtype, "dB")


# tokens, in, R, p, target blocks (token splits), row padding
@pytest.mark.parametrize("case", [(1, 1, 1, 0.0, 1, 0), (65, 64, 8, 0.3, 8, 0),
                                  (200, 129, 16, 0.1, 64, 3), (70, 300, 20, 1.0, 4, 0),
                                  (33, 10, 40, 0.9, 1000, 1)], ids=str)
def test_emulated_lowrank_da(emu, case):
    """dA = dSᵀ·(x ⊙ m), the mask applied as x loads, split over the tokens."""
    T, K, Rk, p, blocks, pad = case
    gen = torch.Generator().manual_seed(T * 13 + K)
    for dtype in DTYPES:
        acc = _acc(dtype)
        x = _rows(T, K, dtype, pad, gen)
        dS = torch.randn(T, Rk, generator=gen, dtype=acc)
        dA = torch.full((Rk, K), float("nan"), dtype=acc)
        assert emu.lk_emu_lowrank_da(_DT[dtype], _ptr(x), x.stride(0), _ptr(dS), _ptr(dA), T, K,
                                     Rk, _ptr(SEED), p, blocks) == 0
        _assert_close(dA, dS.double().t() @ (x.double() * _mask64(T, K, p)), dtype, "dA")


# ---------------------------------------------------------------------------
# The built extension
# ---------------------------------------------------------------------------

_cuda = backends.get("cuda")
needs_extension = pytest.mark.skipif(
    not _cuda.built(), reason=f"the CUDA extension is not built ({_cuda.BUILD_HINT})")


@needs_extension
def test_extension_registers_a_cuda_kernel_for_every_op_with_the_cpu_schema():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels_cuda::{op}", "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels_cuda::{op}",
                                                                  "CPU")
        # The dispatcher's CUDA kernels of the lora_kernels ops (merge_ is a
        # Python op, which reaches lora_kernels_cuda::merge_ through the registry).
        if op != "merge_":
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{op}", "CUDA")
        if backends.reasons("cpu", "cpu"):
            continue
        cuda = str(getattr(torch.ops.lora_kernels_cuda, op).default._schema)
        cpu = str(getattr(torch.ops.lora_kernels_cpu, op).default._schema)
        assert cuda == cpu.replace("lora_kernels_cpu::", "lora_kernels_cuda::")
    assert _cuda.arch_list() and _cuda.cuda_version()


@needs_extension
def test_info_reports_the_extension_and_its_architectures():
    from lora_kernels import info

    line = next(x for x in info.report().splitlines() if x.startswith("cuda extension:"))
    assert "built" in line and "sm_" in line and _cuda.cuda_version() in line


def test_reasons_say_how_to_build_the_extension(monkeypatch):
    monkeypatch.setattr(_cuda, "_C_cuda", None)
    monkeypatch.setattr(_cuda, "_IMPORT_ERROR", ImportError("No module named '_C_cuda'"))
    why = backends.reasons("cuda", "cpu")
    assert why[0].startswith("runs on cuda tensors only")
    assert any("LORA_KERNELS_CUDA=1" in w for w in why)
    from lora_kernels import info

    assert "cuda extension: not built" in info.report()


def test_forcing_cuda_on_cpu_tensors_raises_with_reasons():
    with lk.use_backend("cuda"):
        with pytest.raises(backends.BackendUnavailableError, match="runs on cuda tensors only"):
            torch.ops.lora_kernels.dropout(torch.ones(3), SEED, 0.5)


# ---------------------------------------------------------------------------
# On a GPU: backend "cuda" against the reference and the CPU backend
# ---------------------------------------------------------------------------

# The kernel-level GPU checks of the cuda backend (masks bit for bit, every
# gradient per dtype, merge, embedding, determinism) are shared with the
# Triton backend: tests/test_device_backends.py.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_extension
def test_gpu_cuda_backend_layers_train():
    """Layers on the forced cuda backend (auto prefers triton) equal the reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(lk.Embedding(50, 32, r=4), lk.Linear(32, 48, r=4, lora_dropout=0.1),
                                lk.MergedLinear(48, 48, r=2, lora_dropout=0.1,
                                                enable_lora=[True, False, True])).cuda()
    for m in model:
        torch.nn.init.normal_(m.lora_B)
    idx = torch.randint(0, 50, (4, 16), device="cuda")
    torch.manual_seed(1)
    with lk.use_backend("cuda"):
        model(idx).square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    with lk.use_backend("reference"):
        torch.manual_seed(1)
        model(idx).square().sum().backward()
    for a, b in zip(grads, [p.grad for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
