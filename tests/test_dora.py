"""DoRA's op (dora_linear) and its functional form on every backend against the
reference (PEFT's math in plain torch), float64, and tolerances per dtype."""
import pytest
import torch
from torch.library import opcheck

from lora_kernels import functional as LF
from lora_kernels import ops, reference as R
from tolerances import TOL, skip_unreliable

lk = torch.ops.lora_kernels
SEED = torch.tensor(0x5EED_D02A, dtype=torch.int64)

SHAPES = [
    # tokens, in, out, r
    (7, 9, 5, 3),
    (37, 33, 12, 1),
    (1, 1, 6, 2),
    (0, 7, 4, 2),
    (130, 70, 66, 8),
]


def _inputs(tokens, in_f, out_f, r, dtype=torch.float64, fifo=False, noncontig=False, seed=0):
    """x, W (in W's layout), bias, A, B, magnitude, lora_bias."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = rn(in_f + 3, tokens).t()[:, 1:in_f + 1] if noncontig else rn(tokens, in_f)
    w = rn(out_f, in_f)
    w = w.t().contiguous() if fifo else w
    mag = (torch.rand(out_f, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, rn(out_f), rn(r, in_f), rn(out_f, r), mag, rn(out_f)


def _mag_scale(w, a, b, mag, scaling, fifo):
    return mag / R.dora_weight_norm(w, a, b, scaling, fifo).to(mag.dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p,fifo,noncontig", [(0.0, False, False), (0.3, False, True),
                                              (0.0, True, True), (0.5, True, False)])
def test_op_forward_and_gradients_float64(backend, shape, p, fifo, noncontig):
    """The op with m given, every input differentiable, against the reference
    whose weight norm is taken with the same A and B (detached)."""
    x, w, bias, a, b, mag, _ = _inputs(*shape, fifo=fifo, noncontig=noncontig)
    m = _mag_scale(w, a, b, mag, 1.7, fifo)
    leaves = [t.detach().requires_grad_() for t in (x, w, bias, a, b, m)]
    y, s, z = lk.dora_linear_fwd(*leaves, SEED, 1.7, p, fifo)
    ref = [t.detach().requires_grad_() for t in (x, w, bias, a, b, m)]
    xr, wr, br, ar, bbr, mr = ref
    # The reference with m in place of magnitude / norm: norm 1 gives m itself.
    wt = wr.t() if fifo else wr
    xd = R.dropout(xr, SEED, p)
    y_ref = (torch.nn.functional.linear(xr, wt, br) + (mr - 1) * torch.nn.functional.linear(xd, wt)
             + mr * 1.7 * (xd @ ar.t() @ bbr.t()))
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(s, R.dropout(x, SEED, p) @ a.t(), **TOL[torch.float64])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, t, u in zip(("x", "weight", "bias", "A", "B", "mag"), leaves, ref):
        torch.testing.assert_close(t.grad, u.grad, **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_functional_matches_peft_math_with_batch_dims(backend, p, fifo, lora_bias):
    """LF.dora_linear (weight norm by expansion, cached) against reference.dora_linear
    (norm of the built W + s·ΔW), 3-D input, gradients of x, A, B, magnitude, lora_bias."""
    x, w, bias, a, b, mag, lb = _inputs(24, 19, 13, 4, fifo=fifo, seed=1)
    x = x.reshape(2, 12, 19)
    lb = lb if lora_bias else None
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, a, b, mag, lb)]
    ref = [t.detach().requires_grad_() if t is not None else None for t in (x, a, b, mag, lb)]
    torch.manual_seed(5)
    y = LF.dora_linear(leaves[0], w, bias, leaves[1], leaves[2], leaves[3], 0.8, p, True, fifo,
                       lora_bias=leaves[4])
    torch.manual_seed(5)
    seed = LF.draw_seed("cpu") if p > 0 else 0
    y_ref = R.dora_linear(ref[0], w, bias, ref[1], ref[2], ref[3], 0.8, p, seed, fifo,
                          lora_bias=ref[4])
    assert y.shape == (2, 12, 13) and y._base is None
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, t, u in zip(("x", "A", "B", "magnitude", "lora_bias"), leaves, ref):
        if t is not None:
            torch.testing.assert_close(t.grad, u.grad, **TOL[torch.float64], msg=name)


def test_eval_is_dropout_free_and_training_mask_is_seeded(backend):
    x, w, bias, a, b, mag, _ = _inputs(9, 8, 6, 2, seed=2)
    y_eval = LF.dora_linear(x, w, bias, a, b, mag, 2.0, 0.4, training=False)
    torch.testing.assert_close(y_eval, R.dora_linear(x, w, bias, a, b, mag, 2.0),
                               **TOL[torch.float64])
    torch.manual_seed(3)
    y1 = LF.dora_linear(x, w, bias, a, b, mag, 2.0, 0.4)
    torch.manual_seed(3)
    y2 = LF.dora_linear(x, w, bias, a, b, mag, 2.0, 0.4)
    # The same seed, the same mask (the frozen GEMM is torch's: close, not bitwise).
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y1, y_eval)


@pytest.mark.parametrize("wants", [(True, False, False, False, False, False),
                                   (False, False, False, True, False, False),
                                   (False, False, False, False, True, True),
                                   (True, True, True, True, True, True)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_computes_only_what_is_asked(backend, wants, p):
    x, w, bias, a, b, mag, _ = _inputs(11, 9, 6, 2, seed=4)
    y, s, z = lk.dora_linear_fwd(x, w, bias, a, b, mag, SEED, 0.5, p, False)
    g = torch.randn_like(y)
    x_in = x if (wants[1] or wants[3]) else x.new_empty(0)
    z_in = z if wants[5] else z.new_empty(0)
    outs = lk.dora_linear_bwd(g, x_in, w, a, b, mag, s, z_in, SEED, 0.5, p, False, list(wants))
    full = [t.detach().requires_grad_() for t in (x, w, bias, a, b, mag)]
    lk.dora_linear_fwd(*full, SEED, 0.5, p, False)[0].backward(g)
    for want, out, ref in zip(wants, outs, full):
        if want:
            torch.testing.assert_close(out, ref.grad, **TOL[torch.float64])
        else:
            assert out.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_low_precision(backend, dtype, p):
    skip_unreliable(backend, dtype)
    x, w, bias, a, b, mag, _ = (t * 0.5 for t in _inputs(29, 40, 24, 4, seed=6))
    y64 = LF.dora_linear(x, w, bias, a, b, mag, 2.0, p, training=False)
    y = LF.dora_linear(*(t.to(dtype) for t in (x, w, bias, a, b, mag)), 2.0, p, training=False)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, **TOL[dtype])


def test_autocast_runs_dora_in_the_autocast_dtype(backend):
    """Under autocast the operands go to bf16 (‖W_i‖² stays float32) and the
    gradients reach the fp32 parameters in fp32."""
    skip_unreliable(backend, torch.bfloat16)
    x, w, bias, a, b, mag, _ = (t.float() for t in _inputs(10, 24, 12, 4, seed=13))
    leaves = [t.requires_grad_() for t in (a, b, mag)]
    ref = LF.dora_linear(x, w, bias, *leaves, 1.5, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = LF.dora_linear(x, w, bias, *leaves, 1.5, 0.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, **TOL[torch.bfloat16])
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


@pytest.mark.skipif(not ops.NATIVE, reason="the compiled extension's op")
def test_native_op_checks_weight_sq():
    """The C++ op takes ‖W_i‖² from the caller (functional.weight_row_sq):
    a wrong one is refused, naming it."""
    x, w, bias, a, b, mag, _ = (t.float() for t in _inputs(4, 9, 6, 2, seed=14))
    sq = LF.weight_row_sq(w)
    torch.testing.assert_close(lk.dora_linear(x, w, bias, a, b, mag, sq, 1.0, 0.0, True, False,
                                              None),
                               R.dora_linear(x, w, bias, a, b, mag, 1.0), **TOL[torch.float32])
    with pytest.raises(ValueError, match=r"weight_sq.shape: got \(5,\), expected \(6,\)"):
        lk.dora_linear(x, w, bias, a, b, mag, sq[:5], 1.0, 0.0, True, False, None)
    with pytest.raises(ValueError, match=r"weight_sq: got torch.float64 on cpu, expected "
                                         r"torch.float32"):
        lk.dora_linear(x, w, bias, a, b, mag, sq.double(), 1.0, 0.0, True, False, None)


def test_weight_norm_by_expansion_and_its_cache():
    """‖W + s·(B·A + b_B)‖ without building it equals the built one; ‖W_i‖² is
    cached on W and recomputed when W changes in place."""
    x, w, bias, a, b, mag, lb = _inputs(3, 50, 33, 5, seed=7)
    for fifo in (False, True):
        wl = w.t().contiguous() if fifo else w
        for extra in (None, lb):
            torch.testing.assert_close(LF.dora_weight_norm(wl, a, b, 1.3, fifo, extra),
                                       R.dora_weight_norm(wl, a, b, 1.3, fifo, extra),
                                       **TOL[torch.float64])
    w = w.clone()
    first = LF.weight_row_sq(w)
    assert LF.weight_row_sq(w) is first          # cached
    w.mul_(2.0)                                  # in place: the version counter moves
    torch.testing.assert_close(LF.weight_row_sq(w), first * 4)
    torch.testing.assert_close(LF.dora_weight_norm(w, a, b, 1.3),
                               R.dora_weight_norm(w, a, b, 1.3), **TOL[torch.float64])


def test_bf16_weight_norm_is_taken_in_float32():
    x, w, bias, a, b, mag, _ = _inputs(3, 3000, 7, 4, seed=8)
    wb = w.to(torch.bfloat16)
    got = LF.dora_weight_norm(wb, a.to(torch.bfloat16), b.to(torch.bfloat16), 0.5)
    assert got.dtype == torch.float32
    want = R.dora_weight_norm(wb.double(), a.to(torch.bfloat16).double(),
                              b.to(torch.bfloat16).double(), 0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3)


def test_gradcheck_with_dropout(backend):
    x, w, bias, a, b, mag, _ = _inputs(5, 6, 4, 2, seed=9)
    leaves = tuple(t.requires_grad_() for t in (x, w, bias, a, b, mag))
    assert torch.autograd.gradcheck(
        lambda *t: lk.dora_linear_fwd(*t, SEED, 0.9, 0.3, False)[0], leaves)


def test_opcheck(backend):
    x, w, bias, a, b, mag, _ = _inputs(6, 5, 4, 2, torch.float32, seed=10)
    leaves = [t.requires_grad_() for t in (x, a, b, mag)]
    opcheck(ops.dora_linear_fwd, (leaves[0], w, bias, leaves[1], leaves[2], leaves[3], SEED, 1.5,
                                  0.2, False))
    with torch.no_grad():
        y, s, z = lk.dora_linear_fwd(x, w, bias, a, b, mag, SEED, 1.5, 0.2, False)
    opcheck(ops.dora_linear_bwd, (torch.randn_like(y), x.detach(), w, a.detach(), b.detach(),
                                  mag.detach(), s, z, SEED, 1.5, 0.2, False, [True] * 6))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_holds_x_s_z_and_the_seed(p):
    """Backward keeps x (for dA), s (tokens×r), z (tokens×out, for m's
    gradient), m and the parameters: no dropped copy of x, no mask, no x̂·Wᵀ."""
    x, w, bias, a, b, mag, _ = _inputs(64, 32, 48, 4, torch.float32, seed=11)
    for t in (a, b, mag):
        t.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LF.dora_linear(x, w, bias, a, b, mag, 2.0, p)
    big = sorted(t.numel() for t in saved if t.numel() >= 64 * 4)
    assert big == sorted([64 * 32, 48 * 32, 64 * 4, 64 * 48])  # x, W, s, z


def test_checkpoint_recompute_regenerates_the_mask():
    from torch.utils.checkpoint import checkpoint
    x, w, bias, a, b, mag, _ = _inputs(16, 12, 10, 3, seed=12)
    leaves = [t.requires_grad_() for t in (a, b, mag)]
    torch.manual_seed(1)
    y = LF.dora_linear(x, w, bias, *leaves, 1.5, 0.3)
    y.sum().backward()
    want = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(1)
    y2 = checkpoint(LF.dora_linear, x, w, bias, *leaves, 1.5, 0.3, use_reentrant=False)
    y2.sum().backward()
    torch.testing.assert_close(y2, y)
    for t, g in zip(leaves, want):
        torch.testing.assert_close(t.grad, g)


@pytest.mark.parametrize("change,pattern", [
    (dict(magnitude=torch.randn(5)), r"magnitude.shape: got \(5,\), expected \(6,\)"),
    (dict(lora_A=torch.randn(2, 8)), r"lora_A.shape: got \(2, 8\), expected \(r, 9\)"),
    (dict(lora_B=torch.randn(5, 2)), r"lora_B.shape: got \(5, 2\), expected \(6, 2\)"),
    (dict(x=torch.randn(4, 8)), r"x.shape: got \(4, 8\), expected \(\.\.\., 9\)"),
    (dict(magnitude=torch.rand(6, dtype=torch.float64)), r"magnitude.dtype: got torch.float64"),
    (dict(lora_bias=torch.randn(3)), r"lora_bias.shape: got \(3,\), expected \(6,\)"),
    (dict(dropout_p=1.0), r"lora_dropout: got 1.0, expected a float in \[0, 1\)"),
])
def test_bad_arguments_name_the_argument(change, pattern):
    args = dict(x=torch.randn(4, 9), weight=torch.randn(6, 9), bias=None,
                lora_A=torch.randn(2, 9), lora_B=torch.randn(6, 2), magnitude=torch.rand(6),
                scaling=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        LF.dora_linear(**args)
