"""The C++ CPU kernels (torch.ops.lora_kernels_cpu) against the reference backend.

Every op is called directly with the contract's argument list and compared with
``lora_kernels.backends.reference`` (the same functions, computed with plain
torch from the reference formula and its gradients):

* float64: the dropout mask is bit-identical, so results agree to ~1e-12;
* float32 / bfloat16 / float16: the kernel and the reference are both run on the
  same low-precision inputs and compared with the reference evaluated in float64
  on those inputs (upcast), within the per-dtype tolerances of ``TOL`` below;
* ``dropout`` must equal the reference bit for bit (``torch.equal``);
* what we compute is bitwise the same with 1 and 2 threads, and the frozen
  GEMMs are torch's own calls (see "Determinism across thread counts");
* bad inputs raise RuntimeError naming the argument.
"""

import pytest
import torch

try:
    import lora_kernels._C  # noqa: F401  (registers torch.ops.lora_kernels_cpu)
except ImportError as e:  # pragma: no cover - extension not built
    pytest.skip(f"lora_kernels._C is not built ({e})", allow_module_level=True)

from lora_kernels import reference as R
from lora_kernels.backends import reference as REF

K = torch.ops.lora_kernels_cpu
SEED = torch.tensor([0x5EED_1234_ABCD], dtype=torch.int64)
NEG_SEED = torch.tensor([-0x1234_5678_9ABC_DEF], dtype=torch.int64)  # high key word set

# Kernel vs float64 reference on the same (rounded) inputs. Outputs are O(1):
# inputs are scaled so the low-rank branch is as large as the frozen one.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-4, atol=2e-4),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
HALF = (torch.float16, torch.bfloat16)

# Output masks the autograd wrapper produces in practice (dx, dW, dbias, dA, dB).
MASKS = [
    [True, False, False, True, True],    # LoRA training, input needs grad
    [False, False, False, True, True],   # first layer: only the adapters
    [True, False, False, False, False],  # frozen adapters, input grad only
    [True, True, True, True, True],      # everything trainable
    [False, True, True, False, False],   # frozen adapters, trainable base
    [False, False, False, False, True],  # only B
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def linear_inputs(T, in_f, out_f, r, ng, groups, fifo, bias, dtype, layout="contig", seed=0):
    g = _gen(seed)
    e = len(groups)
    if layout == "transposed":
        x = _rn(g, in_f, T).t()
    elif layout == "sliced":
        x = _rn(g, T, in_f + 5)[:, 2:in_f + 2]
    else:
        x = _rn(g, T, in_f)
    w = _rn(g, *((in_f, out_f) if fifo else (out_f, in_f)), scale=in_f ** -0.5)
    b = _rn(g, out_f) if bias else None
    a = _rn(g, r * e, in_f, scale=in_f ** -0.5)
    bb = _rn(g, out_f // ng * e, r, scale=r ** -0.5)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(a), cast(bb)


def up(t):
    """A float64 copy (never an alias, so in-place reference ops leave t alone)."""
    return None if t is None else t.to(torch.float64, copy=True)


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype],
                               msg=lambda m: f"{what} ({dtype}): {m}")


# ---------------------------------------------------------------------------
# Linear / MergedLinear
# ---------------------------------------------------------------------------

# tokens, in, out, r, num_groups, groups
LINEAR_SHAPES = [
    (0, 7, 12, 3, 3, [0, 2]),
    (1, 1, 5, 1, 1, [0]),
    (7, 9, 12, 3, 3, [1]),
    (37, 33, 66, 8, 3, [0, 2]),
    (130, 70, 66, 3, 1, [0]),
    (130, 7, 5, 8, 1, [0]),
    (37, 70, 12, 1, 3, [0, 1, 2]),
    (1000, 40, 24, 4, 3, [2, 0]),   # several row blocks and slots, a partial last block
]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("fifo,bias", [(False, True), (True, False)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_linear_float64_matches_reference(shape, fifo, bias, p):
    T, in_f, out_f, r, ng, groups = shape
    x, w, b, a, bb = linear_inputs(T, in_f, out_f, r, ng, groups, fifo, bias, torch.float64)
    y, s = K.lora_linear_fwd(x, w, b, a, bb, SEED, 1.7, p, fifo, ng, groups)
    y_ref, s_ref = REF.lora_linear_fwd(x, w, b, a, bb, SEED, 1.7, p, fifo, ng, groups)
    assert y.dtype == s.dtype == torch.float64
    assert_close(y, y_ref, torch.float64, "y")
    assert_close(s, s_ref, torch.float64, "s")
    g = torch.randn(T, out_f, generator=_gen(1), dtype=torch.float64)
    for mask in MASKS:
        xx = x if (mask[1] or mask[3]) else x.new_empty(0)
        got = K.lora_linear_bwd(g, xx, w, a, bb, s, SEED, 1.7, p, fifo, ng, groups, mask)
        ref = REF.lora_linear_bwd(g, xx, w, a, bb, s_ref, SEED, 1.7, p, fifo, ng, groups, mask)
        for name, want, u, v in zip(["dx", "dweight", "dbias", "dA", "dB"], mask, got, ref):
            if not want:
                assert u.numel() == 0, f"{name} not asked for but returned {tuple(u.shape)}"
            assert_close(u, v, torch.float64, f"{name} mask={mask}")


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_linear_noncontiguous_x(layout, p):
    T, in_f, out_f, r, ng, groups = 130, 33, 66, 3, 3, [0, 2]
    x, w, b, a, bb = linear_inputs(T, in_f, out_f, r, ng, groups, False, True, torch.float64,
                                   layout=layout)
    assert not x.is_contiguous()
    y, s = K.lora_linear_fwd(x, w, b, a, bb, SEED, 0.9, p, False, ng, groups)
    y_ref, s_ref = REF.lora_linear_fwd(x, w, b, a, bb, SEED, 0.9, p, False, ng, groups)
    assert_close(y, y_ref, torch.float64, "y")
    assert_close(s, s_ref, torch.float64, "s")
    g = torch.randn(T, out_f, generator=_gen(2), dtype=torch.float64)
    mask = [True, True, True, True, True]
    s_strided = s.t().contiguous().t()  # a non-contiguous s is fine too
    got = K.lora_linear_bwd(g, x, w, a, bb, s_strided, SEED, 0.9, p, False, ng, groups, mask)
    ref = REF.lora_linear_bwd(g, x, w, a, bb, s_ref, SEED, 0.9, p, False, ng, groups, mask)
    for name, u, v in zip(["dx", "dweight", "dbias", "dA", "dB"], got, ref):
        assert_close(u, v, torch.float64, name)
    # A non-contiguous grad (expanded) is fine too.
    g2 = torch.randn(1, out_f, dtype=torch.float64).expand(T, out_f)
    got = K.lora_linear_bwd(g2, x, w, a, bb, s, SEED, 0.9, p, False, ng, groups, mask)
    ref = REF.lora_linear_bwd(g2, x, w, a, bb, s_ref, SEED, 0.9, p, False, ng, groups, mask)
    for name, u, v in zip(["dx", "dweight", "dbias", "dA", "dB"], got, ref):
        assert_close(u, v, torch.float64, name + " (expanded grad)")


@pytest.mark.parametrize("T", [1, 3, 16, 100, 127, 129, 255, 300])
def test_linear_float32_partial_row_blocks(T):
    """float32 runs on the micro-kernel GEMMs, which split a partial row block
    (fewer than 128 tokens) into power-of-two pieces along the rows (M) or the
    inner dimension (K): every piece size, and several blocks, against float64."""
    in_f, out_f, r, ng, groups = 70, 66, 5, 3, [0, 2]
    x, w, b, a, bb = linear_inputs(T, in_f, out_f, r, ng, groups, False, True, torch.float32)
    y, s = K.lora_linear_fwd(x, w, b, a, bb, SEED, 1.5, 0.1, False, ng, groups)
    y_ref, s_ref = REF.lora_linear_fwd(up(x), up(w), up(b), up(a), up(bb), SEED, 1.5, 0.1,
                                       False, ng, groups)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(s, s_ref, torch.float32, "s")
    g = torch.randn(T, out_f, generator=_gen(4))
    mask = [True, False, False, True, True]
    got = K.lora_linear_bwd(g, x, w, a, bb, s, SEED, 1.5, 0.1, False, ng, groups, mask)
    ref = REF.lora_linear_bwd(g.double(), up(x), up(w), up(a), up(bb), s_ref, SEED, 1.5, 0.1,
                              False, ng, groups, mask)
    for name, want, u, v in zip(["dx", "dweight", "dbias", "dA", "dB"], mask, got, ref):
        if want:
            scale = max(1.0, v.abs().max().item())
            assert_close(u / scale, v / scale, torch.float32, name)
    mw = w.clone()  # merge: W's rows in blocks of 128, a partial last one
    K.merge_(mw, a, bb, 0.5, False, ng, groups)
    mw_ref = w.double().clone()
    REF.merge_(mw_ref, up(a), up(bb), 0.5, False, ng, groups)
    assert_close(mw, mw_ref, torch.float32, "merged W")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 33, 66, 8, 3, [0, 2]), (130, 70, 12, 3, 1, [0]),
                                   (7, 9, 5, 1, 1, [0])], ids=str)
@pytest.mark.parametrize("fifo,p", [(False, 0.0), (True, 0.1), (False, 0.5)])
def test_linear_low_precision(dtype, shape, fifo, p):
    T, in_f, out_f, r, ng, groups = shape
    x, w, b, a, bb = linear_inputs(T, in_f, out_f, r, ng, groups, fifo, True, dtype)
    y, s = K.lora_linear_fwd(x, w, b, a, bb, SEED, 1.5, p, fifo, ng, groups)
    y_ref, s_ref = REF.lora_linear_fwd(up(x), up(w), up(b), up(a), up(bb), SEED, 1.5, p, fifo,
                                       ng, groups)
    assert y.dtype == dtype
    assert s.dtype == (torch.float32 if dtype in HALF else dtype)
    assert_close(y, y_ref, dtype, "y")
    assert_close(s, s_ref, dtype, "s")
    g = torch.randn(T, out_f, generator=_gen(3), dtype=torch.float64)
    mask = [True, True, True, True, True]
    got = K.lora_linear_bwd(g.to(dtype), x, w, a, bb, s, SEED, 1.5, p, fifo, ng, groups, mask)
    ref = REF.lora_linear_bwd(g.to(dtype).double(), up(x), up(w), up(a), up(bb), s_ref, SEED, 1.5,
                              p, fifo, ng, groups, mask)
    for name, u, v in zip(["dx", "dweight", "dbias", "dA", "dB"], got, ref):
        assert u.dtype == dtype, name
        # dA and dB sum over tokens: compare relative to their magnitude.
        scale = max(1.0, v.abs().max().item()) if v.numel() else 1.0
        assert_close(u / scale, v / scale, dtype, name)


def test_linear_dropout_one_drops_everything():
    x, w, b, a, bb = linear_inputs(37, 9, 12, 3, 1, [0], False, True, torch.float64)
    y, s = K.lora_linear_fwd(x, w, b, a, bb, SEED, 1.0, 1.0, False, 1, [0])
    assert torch.equal(s, torch.zeros_like(s))
    torch.testing.assert_close(y, torch.addmm(b, x, w.t()))


def test_linear_p0_ignores_seed():
    x, w, b, a, bb = linear_inputs(7, 9, 12, 3, 1, [0], False, True, torch.float64)
    any_seed = torch.empty(0, dtype=torch.int64)
    y, s = K.lora_linear_fwd(x, w, b, a, bb, any_seed, 1.0, 0.0, False, 1, [0])
    y_ref, _ = REF.lora_linear_fwd(x, w, b, a, bb, SEED, 1.0, 0.0, False, 1, [0])
    assert_close(y, y_ref, torch.float64, "y")


# ---------------------------------------------------------------------------
# Dropout: bit for bit
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 9), (130, 70), (1,), (), (0, 5), (2, 1),
                                   (4, 8), (33, 17)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.5, 0.9, 1.0])
def test_dropout_bitwise(dtype, shape, p):
    x = torch.randn(shape, generator=_gen(4), dtype=torch.float64).to(dtype)
    for seed in (SEED, NEG_SEED):
        got = K.dropout(x, seed, p)
        ref = REF.dropout(x, seed, p)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, ref), f"dropout {dtype} {shape} p={p} seed={seed.item()}"


def test_dropout_noncontiguous_and_rate():
    x = torch.randn(70, 130, dtype=torch.float64).t()  # (130, 70), transposed view
    got = K.dropout(x, SEED, 0.3)
    assert torch.equal(got, REF.dropout(x, SEED, 0.3))
    ones = torch.ones(512, 515)
    kept = (K.dropout(ones, SEED, 0.3) != 0).double().mean().item()
    assert abs(kept - 0.7) < 0.01


@pytest.mark.parametrize("seed", [0, 42, -1, 0x0123_4567_89AB_CDEF, -0x5EED])
@pytest.mark.parametrize("n0", [0, 5, 2**32 - 20, 2**40 + 3])
def test_philox_words_match_reference(seed, n0):
    """Every Philox implementation (best SIMD, scalar, AVX2) against the reference,
    including counters whose low word wraps and counters >= 2^32."""
    for count in (0, 1, 7, 16, 37, 100):
        c = torch.arange(count, dtype=torch.int64) + n0
        words = R.philox4x32(seed, c & 0xFFFFFFFF, c >> 32)
        ref = torch.stack(words, -1) if count else torch.empty(0, 4, dtype=torch.int64)
        for isa in (0, 1, 2):
            got = K._philox_words(seed, n0, count, isa)
            assert torch.equal(got, ref), f"isa={isa} seed={seed} n0={n0} count={count}"


# ---------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------

def embedding_inputs(T, num, dim, r, dtype, seed=0):
    g = _gen(seed)
    idx = torch.randint(0, num, (T,), generator=g)
    w = _rn(g, num, dim).to(dtype)
    a = _rn(g, r, num).to(dtype)
    bb = _rn(g, dim, r, scale=r ** -0.5).to(dtype)
    return idx, w, a, bb


@pytest.mark.parametrize("T,num,dim,r", [(0, 5, 12, 3), (1, 5, 5, 1), (37, 50, 33, 8),
                                         (130, 9, 66, 3)], ids=str)
@pytest.mark.parametrize("padding_idx", [-1, 3])
def test_embedding_float64(T, num, dim, r, padding_idx):
    idx, w, a, bb = embedding_inputs(T, num, dim, r, torch.float64)
    if T:
        idx[::4] = 3  # make sure the padding row is hit
    y, s = K.lora_embedding_fwd(idx, w, a, bb, 0.8)
    y_ref, s_ref = REF.lora_embedding_fwd(idx, w, a, bb, 0.8)
    assert_close(y, y_ref, torch.float64, "y")
    assert torch.equal(s, s_ref)
    g = torch.randn(T, dim, generator=_gen(5), dtype=torch.float64)
    for mask in ([False, True, True], [True, True, True], [True, False, False],
                 [False, False, True]):
        got = K.lora_embedding_bwd(g, idx, w, a, bb, s, 0.8, padding_idx, mask)
        ref = REF.lora_embedding_bwd(g, idx, w, a, bb, s_ref, 0.8, padding_idx, mask)
        for name, want, u, v in zip(["dweight", "dA", "dB"], mask, got, ref):
            if not want:
                assert u.numel() == 0
            assert_close(u, v, torch.float64, f"{name} mask={mask}")


def test_embedding_int32_indices_and_strided_s():
    idx, w, a, bb = embedding_inputs(37, 50, 33, 8, torch.float64)
    y, s = K.lora_embedding_fwd(idx.int(), w, a, bb, 0.8)
    y_ref, s_ref = REF.lora_embedding_fwd(idx, w, a, bb, 0.8)
    assert_close(y, y_ref, torch.float64, "y")
    g = torch.randn(37, 33, generator=_gen(11), dtype=torch.float64)
    s_strided = s.t().contiguous().t()
    got = K.lora_embedding_bwd(g, idx.int(), w, a, bb, s_strided, 0.8, 4, [True, True, True])
    ref = REF.lora_embedding_bwd(g, idx, w, a, bb, s_ref, 0.8, 4, [True, True, True])
    for name, u, v in zip(["dweight", "dA", "dB"], got, ref):
        assert_close(u, v, torch.float64, name)


@pytest.mark.parametrize("T,dim,r", [(37, 33, 8), (1, 16, 3), (2, 47, 13), (130, 1, 17),
                                     (5, 64, 1), (64, 100, 16)], ids=str)
@pytest.mark.parametrize("simd", ["1", "0"])
def test_embedding_float32_forward_row_kernel(T, dim, r, simd, monkeypatch):
    """float32 forward on the row kernel (AVX-512 or AVX2, where the CPU has
    it) and on the GEMM path (LORA_KERNELS_CPU_SIMD=0): column tails, odd token counts,
    ranks over one 8-wide chunk, against the float64 reference."""
    monkeypatch.setenv("LORA_KERNELS_CPU_SIMD", simd)
    idx, w, a, bb = embedding_inputs(T, 50, dim, r, torch.float32)
    y, s = K.lora_embedding_fwd(idx, w, a, bb, 0.8)
    y_ref, _ = REF.lora_embedding_fwd(idx, up(w), up(a), up(bb), 0.8)
    assert_close(y, y_ref, torch.float32, "y")
    w_strided = torch.empty(50, dim + 3)[:, :dim].copy_(w)  # not contiguous: the GEMM path
    y2, _ = K.lora_embedding_fwd(idx, w_strided, a, bb, 0.8)
    assert_close(y2, y_ref, torch.float32, "y (strided weight)")


@pytest.mark.parametrize("T,dim,r", [(37, 33, 8), (1, 16, 3), (2, 47, 13), (300, 1, 17),
                                     (5, 130, 1), (257, 300, 16)], ids=str)
@pytest.mark.parametrize("simd", ["1", "0"])
def test_embedding_float32_backward_row_kernel(T, dim, r, simd, monkeypatch):
    """float32 dA/dB on the row kernel (AVX-512 or AVX2, where the CPU has
    it) and on the GEMM path: odd token counts (a last row without a pair, a partial row
    chunk), column tails inside and across the 128-column packed blocks, ranks
    over one 8-wide chunk, each output alone and both, against float64."""
    monkeypatch.setenv("LORA_KERNELS_CPU_SIMD", simd)
    idx, w, a, bb = embedding_inputs(T, 50, dim, r, torch.float32)
    _, s = K.lora_embedding_fwd(idx, w, a, bb, 0.8)
    _, s_ref = REF.lora_embedding_fwd(idx, up(w), up(a), up(bb), 0.8)
    g = torch.randn(T, dim, generator=_gen(9))
    for mask in ([False, True, True], [False, True, False], [False, False, True]):
        got = K.lora_embedding_bwd(g, idx, w, a, bb, s, 0.8, 4, mask)
        ref = REF.lora_embedding_bwd(g.double(), idx, up(w), up(a), up(bb), s_ref, 0.8, 4, mask)
        for name, want, u, v in zip(["dweight", "dA", "dB"], mask, got, ref):
            if want:
                assert u.dtype == torch.float32
                assert_close(u, v, torch.float32, f"{name} mask={mask}")
    g_strided = torch.empty(T, dim + 5)[:, :dim].copy_(g)  # row stride != dim
    got = K.lora_embedding_bwd(g_strided, idx, w, a, bb, s, 0.8, -1, [False, True, True])
    ref = REF.lora_embedding_bwd(g.double(), idx, up(w), up(a), up(bb), s_ref, 0.8, -1,
                                 [False, True, True])
    assert_close(got[1], ref[1], torch.float32, "dA (strided grad)")
    assert_close(got[2], ref[2], torch.float32, "dB (strided grad)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_embedding_low_precision(dtype):
    idx, w, a, bb = embedding_inputs(130, 50, 33, 8, dtype)
    y, s = K.lora_embedding_fwd(idx, w, a, bb, 0.8)
    y_ref, s_ref = REF.lora_embedding_fwd(idx, up(w), up(a), up(bb), 0.8)
    assert y.dtype == dtype and s.dtype == (torch.float32 if dtype in HALF else dtype)
    assert_close(y, y_ref, dtype, "y")
    assert_close(s, s_ref, dtype, "s")
    g = torch.randn(130, 33, generator=_gen(6), dtype=torch.float64).to(dtype)
    got = K.lora_embedding_bwd(g, idx, w, a, bb, s, 0.8, 2, [True, True, True])
    ref = REF.lora_embedding_bwd(g.double(), idx, up(w), up(a), up(bb), s_ref, 0.8, 2,
                                 [True, True, True])
    for name, u, v in zip(["dweight", "dA", "dB"], got, ref):
        assert u.dtype == dtype
        scale = max(1.0, v.abs().max().item())
        assert_close(u / scale, v / scale, dtype, name)


# ---------------------------------------------------------------------------
# merge_
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("ng,groups", [(1, [0]), (3, [0, 2]), (3, [1])])
def test_merge(dtype, fifo, ng, groups):
    in_f, out_f, r = 70, 66, 3
    g = _gen(7)
    w = _rn(g, *((in_f, out_f) if fifo else (out_f, in_f))).to(dtype)
    a = _rn(g, r * len(groups), in_f).to(dtype)
    bb = _rn(g, out_f // ng * len(groups), r).to(dtype)
    got = w.clone()
    K.merge_(got, a, bb, 0.3, fifo, ng, groups)
    ref = up(w)
    REF.merge_(ref, up(a), up(bb), 0.3, fifo, ng, groups)
    assert got.dtype == dtype
    assert_close(got, ref, dtype, "merged weight")
    # unmerge restores W up to rounding
    K.merge_(got, a, bb, -0.3, fifo, ng, groups)
    assert_close(got, w, dtype, "unmerged weight")


def test_merge_mixed_dtypes_and_strided_weight():
    in_f, out_f, r = 33, 12, 3
    g = _gen(8)
    a = _rn(g, r, in_f).float()
    bb = _rn(g, out_f, r).float()
    # bf16 weight, fp32 adapters (the reference casts ΔW to W's dtype)
    w = _rn(g, out_f, in_f).bfloat16()
    got = w.clone()
    K.merge_(got, a, bb, 0.5, False, 1, [0])
    ref = up(w)
    REF.merge_(ref, up(a), up(bb), 0.5, False, 1, [0])
    assert_close(got, ref, torch.bfloat16, "bf16 W, fp32 A/B")
    # a transposed (non-contiguous) fp32 weight is updated in place, through the view
    base = _rn(g, in_f, out_f).float()
    w_t = base.t()
    expected = up(w_t).clone()
    REF.merge_(expected, up(a), up(bb), 0.5, False, 1, [0])
    K.merge_(w_t, a, bb, 0.5, False, 1, [0])
    assert_close(base.t(), expected, torch.float32, "strided W")


# ---------------------------------------------------------------------------
# Determinism across thread counts
#
# The promise: what lora_kernels computes itself (masks, the low-rank
# products, every reduction we write) is bitwise the same for any thread
# count; the frozen GEMMs, done by torch (x·Wᵀ, g·W, gᵀ·x for an unfrozen
# weight, an unfrozen embedding's dense gradient), are exactly torch's own
# calls, so they are as deterministic as torch's matmul on the machine (MKL
# on some Intel CPUs is not, across thread counts). The ops add the frozen
# GEMM onto the low-rank part in place (y += x·Wᵀ, dx += g·W with beta = 1),
# so the two halves are checked apart:
#   * with W = 0 the frozen GEMMs add exact zeros: every output is ours
#     alone, and must not depend on the thread count;
#   * with a real W, each output holding a frozen GEMM must equal our
#     low-rank part (the W = 0 run) completed by torch's own call at the same
#     thread count, bit for bit.
# ---------------------------------------------------------------------------

DET_T, DET_IN, DET_OUT, DET_R, DET_NG, DET_GROUPS = 1100, 70, 66, 8, 3, [0, 2]
DET_EMB = (1100, 50, 33, 8)  # tokens, num_embeddings, dim, r
# Outputs that include a frozen GEMM done by torch.
FROZEN = ("y", "dx", "dweight", "emb_dweight")


def _run_all(zero_weight: bool):
    """Every op's outputs, by name, for float32 and bfloat16 (dropout on,
    every gradient asked for); W = 0 when ``zero_weight``."""
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, a, bb = linear_inputs(DET_T, DET_IN, DET_OUT, DET_R, DET_NG, DET_GROUPS, False,
                                       True, dtype)
        if zero_weight:
            w = torch.zeros_like(w)
        y, s = K.lora_linear_fwd(x, w, b, a, bb, SEED, 1.3, 0.1, False, DET_NG, DET_GROUPS)
        g = torch.randn(DET_T, DET_OUT, generator=_gen(9)).to(dtype)
        dx, dw, db, da, dbb = K.lora_linear_bwd(g, x, w, a, bb, s, SEED, 1.3, 0.1, False, DET_NG,
                                                DET_GROUPS, [True] * 5)
        idx, ew, ea, eb = embedding_inputs(*DET_EMB, dtype)
        ey, es = K.lora_embedding_fwd(idx, ew, ea, eb, 0.7)
        eg = torch.randn(DET_EMB[0], DET_EMB[2], generator=_gen(10)).to(dtype)
        edw, eda, edb = K.lora_embedding_bwd(eg, idx, ew, ea, eb, es, 0.7, 1, [True] * 3)
        mw = w.clone()
        K.merge_(mw, a, bb, 0.5, False, DET_NG, DET_GROUPS)
        named = dict(y=y, s=s, dx=dx, dweight=dw, dbias=db, dA=da, dB=dbb, emb_y=ey, emb_s=es,
                     emb_dweight=edw, emb_dA=eda, emb_dB=edb, merged=mw,
                     dropout=K.dropout(x, SEED, 0.25))
        # What torch's own calls give for the frozen GEMMs, from the same inputs.
        named["torch:x·Wᵀ"] = (x, w)
        named["torch:g·W"] = (g, w)
        named["torch:emb"] = (eg, idx)
        outs.update({f"{k} {dtype}": v for k, v in named.items()})
    return outs


def _at_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _ours(outs):
    return {k: v for k, v in outs.items() if not k.startswith("torch:")}


def test_our_part_is_bitwise_the_same_for_any_thread_count():
    """W = 0: every output is lora_kernels' own computation."""
    one = _ours(_at_threads(1, lambda: _run_all(zero_weight=True)))
    two = _ours(_at_threads(2, lambda: _run_all(zero_weight=True)))
    for k in one:
        assert torch.equal(one[k], two[k]), f"{k} differs between 1 and 2 threads"


def test_outputs_without_a_frozen_gemm_are_bitwise_the_same_for_any_thread_count():
    one = _ours(_at_threads(1, lambda: _run_all(zero_weight=False)))
    two = _ours(_at_threads(2, lambda: _run_all(zero_weight=False)))
    for k in one:
        if k.split()[0] not in FROZEN:
            assert torch.equal(one[k], two[k]), f"{k} differs between 1 and 2 threads"


@pytest.mark.parametrize("threads", [1, 2])
def test_frozen_gemms_are_torchs_own_calls(threads):
    """With a real W, y, dx and the weights' gradients are our low-rank part
    completed by exactly torch's GEMM (or embedding backward) at the same
    thread count, bit for bit."""
    def check():
        real, lowrank = _run_all(zero_weight=False), _run_all(zero_weight=True)
        for dtype in (torch.float32, torch.bfloat16):
            x, w = real[f"torch:x·Wᵀ {dtype}"]
            g, _ = real[f"torch:g·W {dtype}"]
            eg, idx = real[f"torch:emb {dtype}"]
            want = {
                "y": lowrank[f"y {dtype}"].clone().addmm_(x, w.t()),
                "dx": lowrank[f"dx {dtype}"].clone().addmm_(g, w),
                "dweight": torch.mm(g.t(), x),
                "emb_dweight": torch.ops.aten.embedding_dense_backward(
                    eg, idx, DET_EMB[1], 1, False),
            }
            for name, expected in want.items():
                got = real[f"{name} {dtype}"]
                assert torch.equal(got, expected), f"{name} {dtype} at {threads} threads"
    _at_threads(threads, check)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_inputs_that_require_grad(dtype):
    """The autograd wrapper hands the kernels tensors that require grad; the
    kernels (and their worker threads) must treat them as plain data."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w, b, a, bb = linear_inputs(300, 33, 66, 8, 3, [0, 2], False, True, dtype)
        leaves = [t.requires_grad_() for t in (x, w, b, a, bb)]
        y, s = K.lora_linear_fwd(*leaves, SEED, 1.1, 0.1, False, 3, [0, 2])
        g = torch.randn_like(y)
        K.lora_linear_bwd(g, x, w, a, bb, s, SEED, 1.1, 0.1, False, 3, [0, 2], [True] * 5)
        K.dropout(x, SEED, 0.3)
        idx, ew, ea, eb = embedding_inputs(300, 50, 33, 8, dtype)
        for t in (ew, ea, eb):
            t.requires_grad_()
        ey, es = K.lora_embedding_fwd(idx, ew, ea, eb, 0.7)
        K.lora_embedding_bwd(torch.randn_like(ey), idx, ew, ea, eb, es, 0.7, -1, [True] * 3)
        with torch.no_grad():
            K.merge_(w, a, bb, 0.5, False, 3, [0, 2])
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _good_linear():
    x, w, b, a, bb = linear_inputs(7, 9, 12, 2, 3, [0, 2], False, True, torch.float32)
    return dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, seed=SEED, scaling=1.0,
                dropout_p=0.1, fan_in_fan_out=False, num_groups=3, groups=[0, 2])


def _fwd(**kw):
    args = _good_linear()
    args.update(kw)
    return K.lora_linear_fwd(*args.values())


@pytest.mark.parametrize("change,pattern", [
    (dict(x=torch.randn(2, 7, 9)), r"x must be 2-D, got 3-D"),
    (dict(x=torch.randn(7, 9, dtype=torch.float64)), r"weight must have the dtype of x"),
    (dict(x=torch.randint(0, 3, (7, 9))), r"x must be float32"),
    (dict(weight=torch.randn(12, 8)), r"weight must have shape .*in_features = 9"),
    (dict(bias=torch.randn(11)), r"bias must have shape \[12\]"),
    (dict(lora_A=torch.randn(4, 8)), r"lora_A must have shape"),
    (dict(lora_A=torch.randn(3, 9)), r"lora_A rows \(3\)"),
    (dict(lora_B=torch.randn(8, 3)), r"lora_B must have shape \[8, 2\]"),
    (dict(lora_B=torch.randn(8, 2, dtype=torch.float64)), r"lora_B must have the dtype of x"),
    (dict(num_groups=5), r"num_groups \(5\) must divide the out features \(12\)"),
    (dict(groups=[0, 3]), r"groups must lie in \[0, num_groups=3\)"),
    (dict(groups=[2, 2]), r"groups must be distinct"),
    (dict(dropout_p=1.5), r"dropout probability must be in \[0, 1\], got 1.5"),
    (dict(seed=torch.tensor([1, 2])), r"seed must have exactly one element, got 2"),
    (dict(seed=torch.tensor([1], dtype=torch.int32)), r"seed must be an int64 tensor"),
])
def test_linear_fwd_bad_inputs(change, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        _fwd(**change)


def test_linear_bwd_bad_inputs():
    a = _good_linear()
    y, s = _fwd()
    g = torch.randn(7, 12)
    args = [g, a["x"], a["weight"], a["lora_A"], a["lora_B"], s, SEED, 1.0, 0.1, False, 3, [0, 2]]
    with pytest.raises(RuntimeError, match=r"output_mask must have 5 flags"):
        K.lora_linear_bwd(*args, [True, True])
    bad = list(args)
    bad[1] = torch.randn(6, 9)
    with pytest.raises(RuntimeError, match=r"x must have shape \[7, 9\]"):
        K.lora_linear_bwd(*bad, [False, False, False, True, False])
    # x may be empty when neither dA nor dweight is asked for
    K.lora_linear_bwd(*bad[:1], torch.empty(0), *bad[2:], [True, False, True, False, True])
    bad = list(args)
    bad[5] = torch.randn(7, 3)
    with pytest.raises(RuntimeError, match=r"s must have shape \[7, 4\]"):
        K.lora_linear_bwd(*bad, [False, False, False, False, True])
    bad = list(args)
    bad[0] = torch.randn(7, 13)
    with pytest.raises(RuntimeError, match=r"weight must have 13 out features"):
        K.lora_linear_bwd(*bad, [True, False, False, False, False])


def test_embedding_and_merge_and_dropout_bad_inputs():
    idx, w, a, bb = embedding_inputs(7, 5, 12, 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, num_embeddings=5\), got 5"):
        K.lora_embedding_fwd(torch.tensor([0, 5]), w, a, bb, 1.0)
    with pytest.raises(RuntimeError, match=r"indices must be 1-D"):
        K.lora_embedding_fwd(idx.view(7, 1), w, a, bb, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_A must have shape \[3, 5\]"):
        K.lora_embedding_fwd(idx, w, a[:, :4], bb, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_B must have the dtype of weight"):
        K.lora_embedding_fwd(idx, w, a, bb.double(), 1.0)
    y, s = K.lora_embedding_fwd(idx, w, a, bb, 1.0)
    with pytest.raises(RuntimeError, match=r"grad must have shape \[7, 12\]"):
        K.lora_embedding_bwd(torch.randn(7, 11), idx, w, a, bb, s, 1.0, -1, [True, True, True])
    with pytest.raises(RuntimeError, match=r"padding_idx must be -1"):
        K.lora_embedding_bwd(torch.randn(7, 12), idx, w, a, bb, s, 1.0, 9, [True, True, True])
    with pytest.raises(RuntimeError, match=r"weight must be 2-D"):
        K.merge_(torch.randn(3), a, bb, 1.0, False, 1, [0])
    with pytest.raises(RuntimeError, match=r"lora_A must have shape \[r\*len\(groups\), 12\]"):
        K.merge_(torch.randn(5, 12), torch.randn(3, 11), torch.randn(5, 3), 1.0, False, 1, [0])
    with pytest.raises(RuntimeError, match=r"dropout probability must be in \[0, 1\], got -0.1"):
        K.dropout(torch.randn(3, 4), SEED, -0.1)
    with pytest.raises(RuntimeError, match=r"x must be float32"):
        K.dropout(torch.arange(4), SEED, 0.5)
