"""dropped_linear / dropped_linear_bwd_ (the frozen GEMM over dropout's dropped
entries only: csrc/dropped_linear.h) against the formula on the reference
mask, and DoRA's C++ composite, which uses them on the CPU, against the
reference."""
import pytest
import torch
from torch.library import opcheck

from lora_kernels import ops, reference as R
from tolerances import TOL

lk = torch.ops.lora_kernels
SEED = torch.tensor(0x0D20_99ED, dtype=torch.int64)

pytestmark = pytest.mark.skipif(not ops.NATIVE, reason="the C++ extension is not built")

SHAPES = [
    # tokens, in, out: odd sizes (not multiples of the 8-lane mask words, the
    # 64/32-feature weight blocks or the 512-row k-tiles), more than one row
    # block of 128, one token, an empty batch, no out features
    (7, 9, 5),
    (130, 70, 66),
    (261, 530, 97),
    (1, 16, 3),
    (0, 8, 4),
    (5, 8, 0),
]


def _dropped(shape, p, dtype=torch.float64):
    """1 − D: the entries the reference dropout drops."""
    return (R.dropout(torch.ones(shape, dtype=torch.float64), SEED, p) == 0).to(dtype)


def _rn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _weight(out_f, in_f, layout, dtype=torch.float64):
    """W (out, in) as stored (out, in), as the view of an (in, out) matrix
    (fan_in_fan_out), or with a row stride larger than in."""
    if layout == "standard":
        return _rn(out_f, in_f, dtype=dtype, seed=1)
    if layout == "transposed":
        return _rn(in_f, out_f, dtype=dtype, seed=1).t()
    return _rn(out_f, in_f + 5, dtype=dtype, seed=1)[:, 2:in_f + 2]


def each_case(test):
    """test over every shape, dropout (none, some, all), W layout and dtype."""
    marks = [pytest.mark.parametrize("shape", SHAPES, ids=str),
             pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 1.0]),
             pytest.mark.parametrize("layout", ["standard", "transposed", "strided"]),
             pytest.mark.parametrize("dtype", [torch.float64, torch.float32])]
    for mark in reversed(marks):
        test = mark(test)
    return test


@each_case
def test_forward_matches_the_formula(shape, p, layout, dtype):
    tokens, in_f, out_f = shape
    x, inp = _rn(tokens, in_f, dtype=dtype), _rn(tokens, out_f, dtype=dtype, seed=2)
    w = _weight(out_f, in_f, layout, dtype)
    want = 0.7 * inp.double() - 1.3 * (x.double() * _dropped(x.shape, p)) @ w.double().t()
    got = lk.dropped_linear(inp, x, w, SEED, p, 0.7, -1.3)
    assert got.dtype == dtype and got.shape == (tokens, out_f)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    # beta = 0 ignores input (as addmm does): NaNs there do not leak
    got0 = lk.dropped_linear(torch.full_like(inp, float("nan")), x, w, SEED, p, 0.0, 2.0)
    torch.testing.assert_close(got0.double(), 2.0 * (x.double() * _dropped(x.shape, p))
                               @ w.double().t(), **TOL[dtype])


@each_case
def test_backward_matches_the_formula(shape, p, layout, dtype):
    tokens, in_f, out_f = shape
    h, dx = _rn(tokens, out_f, dtype=dtype), _rn(tokens, in_f, dtype=dtype, seed=3)
    w = _weight(out_f, in_f, layout, dtype)
    want = dx.double() - 0.9 * (h.double() @ w.double()) * _dropped(dx.shape, p)
    lk.dropped_linear_bwd_(dx, h, w, SEED, p, -0.9)
    torch.testing.assert_close(dx.double(), want, **TOL[dtype])


def test_noncontiguous_operands_and_half_dtypes():
    """A non-contiguous x, grad or dx, and bfloat16 (the dense form) give the
    same as contiguous float64."""
    x = _rn(40, 23).t().contiguous().t()  # column-major
    w = _weight(19, 23, "standard")
    inp = _rn(19, 40).t()
    want = 0.5 * inp - (x * _dropped(x.shape, 0.2)) @ w.t()
    torch.testing.assert_close(lk.dropped_linear(inp, x, w, SEED, 0.2, 0.5, -1.0), want,
                               **TOL[torch.float64])
    got = lk.dropped_linear(inp.bfloat16(), x.bfloat16(), w.bfloat16(), SEED, 0.2, 0.5, -1.0)
    torch.testing.assert_close(got.double(), want, atol=0.15, rtol=5e-2)
    h = _rn(19, 40, seed=4).t()
    dx = _rn(23, 40, seed=5).t()  # non-contiguous: updated in place all the same
    want = dx + 2.0 * (h @ w) * _dropped(dx.shape, 0.2)
    lk.dropped_linear_bwd_(dx, h, w, SEED, 0.2, 2.0)
    torch.testing.assert_close(dx, want, **TOL[torch.float64])


def test_results_do_not_depend_on_the_thread_count():
    x, inp, h = _rn(300, 130), _rn(300, 70, seed=2), _rn(300, 70, seed=3)
    w = _weight(70, 130, "standard", torch.float32)
    x, inp, h = x.float(), inp.float(), h.float()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            dx = torch.zeros(300, 130)
            lk.dropped_linear_bwd_(dx, h, w, SEED, 0.1, 1.0)
            outs.append((lk.dropped_linear(inp, x, w, SEED, 0.1, 1.0, 1.0), dx))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("call, pattern", [
    (lambda x, w, i: lk.dropped_linear(i, x, w[:, :-1], SEED, 0.1, 1.0, 1.0),
     r"weight must have shape \[out, 6\]"),
    (lambda x, w, i: lk.dropped_linear(i[:, :-1], x, w, SEED, 0.1, 1.0, 1.0),
     r"input must have shape \[4, 3\]"),
    (lambda x, w, i: lk.dropped_linear(i, x.float(), w, SEED, 0.1, 1.0, 1.0),
     r"weight must have the dtype of x"),
    (lambda x, w, i: lk.dropped_linear(i, x, w, SEED, 1.5, 1.0, 1.0),
     r"dropout probability must be in \[0, 1\], got 1.5"),
    (lambda x, w, i: lk.dropped_linear_bwd_(x, i[:, :-1], w, SEED, 0.1, 1.0),
     r"grad must have shape \[4, 3\]"),
    (lambda x, w, i: lk.dropped_linear_bwd_(x[:, :-1], i, w, SEED, 0.1, 1.0),
     r"weight must have shape \[out, 5\]"),
])
def test_bad_arguments_name_the_argument(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call(_rn(4, 6), _weight(3, 6, "standard"), _rn(4, 3))


def test_opcheck():
    x, w, inp = _rn(6, 5).float(), _weight(4, 5, "standard", torch.float32), _rn(6, 4).float()
    opcheck(ops.dropped_linear, (inp, x, w, SEED, 0.2, 1.0, -1.0))
    opcheck(ops.dropped_linear_bwd_, (torch.zeros(6, 5), inp, w, SEED, 0.2, 1.0))


# DoRA's C++ composite (no backend named: the dispatcher's CPU route) takes
# the dropped-entries path for float32/float64 at dropout ≤ 0.1 with ≥ 128
# tokens and tokens · in · out ≥ 2**24 (csrc/dora_linear.cpp, sparse_dropped).

def _ops_run(fn):
    """fn's result, and the names of the lora_kernels ops it ran (forward and
    backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events() if e.name.startswith("lora_kernels::")}


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("tokens", [0, 3, 127, 1000])
def test_dora_composite_with_dropout_matches_the_reference(p, fifo, tokens):
    in_f, out_f, r, scaling = 1030, 259, 4, 1.7  # 127 tokens: 2**25 multiply-adds
    x, bias, a, b = _rn(tokens, in_f), _rn(out_f, seed=6), _rn(r, in_f, seed=7), \
        _rn(out_f, r, seed=8)
    w = _rn(in_f, out_f, seed=1) if fifo else _rn(out_f, in_f, seed=1)
    m = torch.rand(out_f, dtype=torch.float64) + 0.5
    leaves = [t.clone().requires_grad_() for t in (x, w, bias, a, b, m)]
    g = _rn(tokens, out_f, seed=9)

    def step():
        y, s, z = lk.dora_linear_fwd(*leaves, SEED, scaling, p, fifo)
        y.backward(g)
        return y
    y, ran = _ops_run(step)
    sparse = p <= 0.1 and tokens >= 128 and tokens * in_f * out_f >= 2**24
    assert ("lora_kernels::dropped_linear" in ran) == sparse, ran
    assert ("lora_kernels::dropped_linear_bwd_" in ran) == sparse, ran
    ref = [t.clone().requires_grad_() for t in (x, w, bias, a, b, m)]
    xr, wr, br, ar, bbr, mr = ref
    wt = wr.t() if fifo else wr
    xd = R.dropout(xr, SEED, p)
    y_ref = (torch.nn.functional.linear(xr, wt, br) + (mr - 1) * torch.nn.functional.linear(xd, wt)
             + mr * scaling * (xd @ ar.t() @ bbr.t()))
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    y_ref.backward(g)
    for name, t, u in zip(("x", "weight", "bias", "A", "B", "mag"), leaves, ref):
        torch.testing.assert_close(t.grad, u.grad, **TOL[torch.float64], msg=name)


def test_dora_composite_float32_3d_input():
    """The user-facing op on a (batch, seq, in) float32 input at dropout 0.1,
    large enough for the dropped-entries path, against the float64 reference
    with the same seed."""
    x, w, a, b = _rn(4, 300, 240), _rn(250, 240, seed=1), _rn(8, 240, seed=2), \
        _rn(250, 8, seed=3)
    mag = torch.rand(250, dtype=torch.float64) + 0.5
    torch.manual_seed(5)
    got = lk.dora_linear(x.float(), w.float(), None, a.float(), b.float(), mag.float(),
                         w.float().square().sum(1), 0.5, 0.1, True, False, None)
    torch.manual_seed(5)
    seed = torch.randint(-2**63, 2**63 - 1, ())
    want = R.dora_linear(x, w, None, a, b, mag, 0.5, 0.1, seed=seed)
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
