"""lora_delta: the LoRA branch around a base layer computed elsewhere, on every
backend against the reference (float64; tolerances per dtype), through the
op, the functional form and autograd."""
import pytest
import torch
from torch.library import opcheck

from lora_kernels import functional as LF
from lora_kernels import ops, reference as R
from lora_kernels.ops import lowrank_dtype
from tolerances import TOL, skip_unreliable

lk = torch.ops.lora_kernels
SEED = torch.tensor(0x5EED_0D17A, dtype=torch.int64)

SHAPES = [
    # tokens, in, out, r, num_groups, groups
    (7, 9, 5, 3, 1, [0]),
    (37, 33, 12, 1, 3, [0, 2]),
    (1, 1, 6, 2, 3, [1]),
    (0, 7, 4, 2, 1, [0]),
    (130, 70, 66, 8, 2, [0, 1]),
]


def _inputs(tokens, in_f, out_f, r, G, groups, dtype=torch.float64, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    e = len(groups)
    if noncontig:
        x = rn(in_f + 3, tokens).t()[:, 1:in_f + 1]
        base = rn(out_f, tokens).t()
    else:
        x, base = rn(tokens, in_f), rn(tokens, out_f)
    return x, base, rn(r * e, in_f), rn(out_f // G * e, r)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p,noncontig", [(0.0, False), (0.3, False), (0.5, True)])
def test_forward_and_gradients_float64(backend, shape, p, noncontig):
    tokens, in_f, out_f, r, G, groups = shape
    inputs = _inputs(tokens, in_f, out_f, r, G, groups, noncontig=noncontig)
    leaves = [t.detach().requires_grad_() for t in inputs]
    y, s = lk.lora_delta_fwd(*leaves, SEED, 1.7, p, G, groups)
    ref = [t.detach().requires_grad_() for t in inputs]
    y_ref = R.lora_delta(*ref, 1.7, p, SEED, G, groups)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(s, R.dropout(inputs[0], SEED, p) @ inputs[2].t(),
                               **TOL[torch.float64])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, t, u in zip(("x", "base", "A", "B"), leaves, ref):
        torch.testing.assert_close(t.grad, u.grad, **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False),
                                   (False, False, True), (True, True, True)], ids=str)
def test_backward_computes_only_what_is_asked(backend, wants):
    x, base, a, bb = _inputs(11, 9, 6, 2, 3, [0, 2])
    y, s = lk.lora_delta_fwd(x, base, a, bb, SEED, 0.5, 0.25, 3, [0, 2])
    g = torch.randn_like(y)
    x_in = x if wants[1] else x.new_empty(0)
    outs = lk.lora_delta_bwd(g, x_in, a, bb, s, SEED, 0.5, 0.25, 3, [0, 2], list(wants))
    full = [t.detach().requires_grad_() for t in (x, a, bb)]
    R.lora_delta(full[0], base, full[1], full[2], 0.5, 0.25, SEED, 3, [0, 2]).backward(g)
    for want, out, ref in zip(wants, outs, full):
        if want:
            torch.testing.assert_close(out, ref.grad, **TOL[torch.float64])
        else:
            assert out.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    skip_unreliable(backend, dtype)
    x, base, a, bb = (t * 0.5 for t in _inputs(29, 40, 24, 4, 1, [0]))
    y64, _ = lk.lora_delta_fwd(x, base, a, bb, SEED, 2.0, 0.1, 1, [0])
    y, s = lk.lora_delta_fwd(*(t.to(dtype) for t in (x, base, a, bb)), SEED, 2.0, 0.1, 1, [0])
    assert y.dtype == dtype and s.dtype == lowrank_dtype(dtype)
    torch.testing.assert_close(y.double(), y64, **TOL[dtype])


def test_functional_form_batch_dims_and_training_switch(backend):
    """Leading batch dims, eval mode (no dropout), the enable_lora groups."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    base = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    a = torch.randn(4, 8, generator=g, dtype=torch.float64)
    bb = torch.randn(4, 2, generator=g, dtype=torch.float64)
    y = LF.lora_delta(x, base, a, bb, 0.7, 0.4, training=False, enable_lora=[True, False, True])
    assert y.shape == base.shape and y._base is None
    torch.testing.assert_close(y, R.lora_delta(x, base, a, bb, 0.7, 0.0, 0, 3, [0, 2]),
                               **TOL[torch.float64])
    torch.manual_seed(11)
    y1 = LF.lora_delta(x, base, a, bb, 0.7, 0.4, True, [True, False, True])
    torch.manual_seed(11)
    y2 = LF.lora_delta(x, base, a, bb, 0.7, 0.4, True, [True, False, True])
    assert torch.equal(y1, y2) and not torch.equal(y1, y)  # a seeded mask


def test_gradcheck_with_dropout(backend):
    x, base, a, bb = (t.requires_grad_() for t in _inputs(5, 6, 4, 2, 2, [1]))
    assert torch.autograd.gradcheck(
        lambda *t: lk.lora_delta_fwd(*t, SEED, 0.9, 0.3, 2, [1])[0], (x, base, a, bb))


def test_opcheck(backend):
    x, base, a, bb = _inputs(6, 5, 4, 2, 2, [1], torch.float32)
    leaves = [t.requires_grad_() for t in (x, a, bb)]
    opcheck(ops.lora_delta_fwd, (leaves[0], base, leaves[1], leaves[2], SEED, 1.5, 0.2, 2, [1]))
    with torch.no_grad():
        y, s = lk.lora_delta_fwd(x, base, a, bb, SEED, 1.5, 0.2, 2, [1])
    opcheck(ops.lora_delta_bwd, (torch.randn_like(y), x.detach(), a.detach(), bb.detach(), s,
                                 SEED, 1.5, 0.2, 2, [1], [True, True, True]))


def test_holds_s_and_the_seed_not_x_or_base():
    """With A and B trainable and x not needing a gradient, backward keeps
    x (for dA), s (tokens×r) and the seed; never base or a dropped copy of x."""
    x, base, a, bb = _inputs(64, 32, 48, 4, 1, [0], torch.float32)
    a.requires_grad_()
    bb.requires_grad_()
    base.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LF.lora_delta(x, base, a, bb, 2.0, 0.1)
    sizes = sorted(t.numel() for t in saved if t.numel() > 1)
    assert all(t.data_ptr() != base.data_ptr() for t in saved)
    assert sizes == sorted([64 * 32, 64 * 4, 4 * 32, 48 * 4])  # x, s, A, B


@pytest.mark.parametrize("change,pattern", [
    (dict(base=torch.randn(7, 5)), r"base.shape: got \(7, 5\), expected x's leading"),
    (dict(lora_A=torch.randn(2, 8)), r"lora_A.shape: got \(2, 8\), expected \(r\*1, 9\)"),
    (dict(lora_B=torch.randn(5, 3)), r"lora_B.shape: got \(5, 3\), expected \(6, 2\)"),
    (dict(base=torch.randn(6, 6, dtype=torch.float64)), r"base.dtype: got torch.float64"),
])
def test_bad_arguments_name_the_argument(change, pattern):
    args = dict(x=torch.randn(6, 9), base=torch.randn(6, 6), lora_A=torch.randn(2, 9),
                lora_B=torch.randn(6, 2))
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        LF.lora_delta(args["x"], args["base"], args["lora_A"], args["lora_B"], 1.0)
