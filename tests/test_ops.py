"""The lora_kernels ops on each backend against the plain reference formula."""
import itertools

import pytest
import torch
from torch.library import opcheck

from lora_kernels import ops, reference as R
from lora_kernels.ops import lowrank_dtype
from tolerances import TOL, skip_unreliable

lk = torch.ops.lora_kernels
SEED = torch.tensor(0x5EED_1234_ABCD, dtype=torch.int64)


def _linear_inputs(tokens, in_f, out_f, r, num_groups, groups, fifo, bias, dtype,
                   noncontig=False, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    e = len(groups)
    if noncontig:
        x = rn(in_f + 3, tokens).t()[:, 1:in_f + 1]  # transposed and column-sliced
    else:
        x = rn(tokens, in_f)
    w = rn(in_f, out_f) if fifo else rn(out_f, in_f)
    b = rn(out_f) if bias else None
    a = rn(r * e, in_f)
    bb = rn(out_f // num_groups * e, r)
    return x, w, b, a, bb


LINEAR_SHAPES = [
    # tokens, in, out, r, num_groups, groups
    (7, 9, 5, 3, 1, [0]),
    (37, 33, 12, 1, 3, [0, 2]),
    (1, 1, 6, 2, 3, [1]),
    (0, 7, 4, 2, 1, [0]),
    (130, 70, 66, 8, 2, [0, 1]),
]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("fifo,bias,p,noncontig", [
    (False, True, 0.0, False), (True, False, 0.3, False), (False, True, 0.5, True),
    (True, True, 0.1, True)])
def test_linear_forward_and_gradients_float64(backend, shape, fifo, bias, p, noncontig):
    tokens, in_f, out_f, r, G, groups = shape
    x, w, b, a, bb = _linear_inputs(tokens, in_f, out_f, r, G, groups, fifo, bias,
                                    torch.float64, noncontig)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    y, s = lk.lora_linear_fwd(*leaves, SEED, 1.7, p, fifo, G, groups)
    ref_leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    y_ref = R.lora_linear(*ref_leaves, 1.7, p, SEED, fifo, G, groups)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(s, R.dropout(x, SEED, p) @ a.t(), **TOL[torch.float64])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, t, u in zip("x w b A B".split(), leaves, ref_leaves):
        if t is not None:
            torch.testing.assert_close(t.grad, u.grad, **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("wants", [m for m in itertools.product([False, True], repeat=5)
                                   if any(m)], ids=str)
def test_linear_backward_computes_only_what_is_asked(backend, wants):
    x, w, b, a, bb = _linear_inputs(11, 9, 6, 2, 3, [0, 2], False, True, torch.float64)
    y, s = lk.lora_linear_fwd(x, w, b, a, bb, SEED, 0.5, 0.25, False, 3, [0, 2])
    g = torch.randn_like(y)
    x_in = x if (wants[1] or wants[3]) else x.new_empty(0)
    outs = lk.lora_linear_bwd(g, x_in, w, a, bb, s, SEED, 0.5, 0.25, False, 3, [0, 2],
                              list(wants))
    full = [t.detach().requires_grad_() for t in (x, w, b, a, bb)]
    R.lora_linear(*full, 0.5, 0.25, SEED, False, 3, [0, 2]).backward(g)
    for want, out, ref in zip(wants, outs, full):
        if want:
            torch.testing.assert_close(out, ref.grad, **TOL[torch.float64])
        else:
            assert out.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_low_precision(backend, dtype):
    skip_unreliable(backend, dtype)
    x, w, b, a, bb = _linear_inputs(29, 40, 24, 4, 1, [0], False, True, torch.float64)
    x, w, b, a, bb = (t * 0.5 for t in (x, w, b, a, bb))
    y64, _ = lk.lora_linear_fwd(x, w, b, a, bb, SEED, 2.0, 0.1, False, 1, [0])
    y, s = lk.lora_linear_fwd(*(t.to(dtype) for t in (x, w, b, a, bb)), SEED, 2.0, 0.1,
                              False, 1, [0])
    assert y.dtype == dtype and s.dtype == lowrank_dtype(dtype)
    torch.testing.assert_close(y.double(), y64, **TOL[dtype])


@pytest.mark.parametrize("tokens,num,dim,r,pad", [(9, 11, 6, 3, -1), (40, 17, 13, 1, 4),
                                                  (0, 5, 4, 2, -1)])
def test_embedding_forward_and_gradients_float64(backend, tokens, num, dim, r, pad):
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, num, (tokens,), generator=g)
    if tokens and pad >= 0:
        idx[::3] = pad
    w, a, bb = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
                for s in ((num, dim), (r, num), (dim, r)))
    y, s = lk.lora_embedding_fwd(idx, w, a, bb, 0.75, pad)
    ref = [t.detach().requires_grad_() for t in (w, a, bb)]
    y_ref = R.lora_embedding(idx, *ref, 0.75, None if pad < 0 else pad)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for t, u in zip((w, a, bb), ref):
        torch.testing.assert_close(t.grad, u.grad, **TOL[torch.float64])


def test_embedding_with_a_non_contiguous_weight(backend):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 13, generator=g, dtype=torch.float64).t()  # (13, 6), strided
    a = torch.randn(2, 13, generator=g, dtype=torch.float64)
    bb = torch.randn(6, 2, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 13, (200,), generator=g)
    y, _ = lk.lora_embedding_fwd(idx, w, a, bb, 0.5, -1)
    torch.testing.assert_close(y, R.lora_embedding(idx, w, a, bb, 0.5), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fifo,G,groups", [(False, 1, [0]), (True, 1, [0]), (False, 3, [0, 2]),
                                           (True, 2, [1])])
def test_merge_unmerge(backend, dtype, fifo, G, groups):
    skip_unreliable(backend, dtype)
    x, w, b, a, bb = _linear_inputs(1, 13, 12, 3, G, groups, fifo, False, torch.float64)
    expected = R.merged_weight(w, a, bb, 0.6, fifo, G, groups)
    wm = w.to(dtype).clone()
    lk.merge_(wm, a.to(dtype), bb.to(dtype), 0.6, fifo, G, groups)
    torch.testing.assert_close(wm.double(), expected, **TOL[dtype])
    lk.unmerge_(wm, a.to(dtype), bb.to(dtype), 0.6, fifo, G, groups)
    torch.testing.assert_close(wm.double(), w.to(dtype).double(), **TOL[dtype])


def test_merged_weight_op_and_gradients(backend):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = lk.merged_weight(w, a, bb, 0.5)
    torch.testing.assert_close(out, w + 0.5 * (bb @ a).view(w.shape), **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda *t: lk.merged_weight(*t, 0.5), (w, a, bb))


def test_gradcheck_linear_with_dropout(backend):
    x, w, b, a, bb = _linear_inputs(5, 6, 6, 2, 2, [0, 1], True, True, torch.float64)
    args = [t.requires_grad_() for t in (x, w, b, a, bb)]
    fn = lambda *t: lk.lora_linear_fwd(*t, SEED, 1.3, 0.4, True, 2, [0, 1])[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_embedding(backend):
    idx = torch.tensor([0, 3, 3, 1, 4])
    w, a, bb = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
                for s in ((5, 4), (2, 5), (4, 2)))
    fn = lambda *t: lk.lora_embedding_fwd(idx, *t, 0.5, -1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w, a, bb))


def _opcheck_samples():
    x, w, b, a, bb = _linear_inputs(6, 5, 4, 2, 2, [1], False, True, torch.float32)
    grads = [t.requires_grad_() for t in (x, a, bb)]
    yield ops.lora_linear_fwd, (x, w, b, a, bb, SEED, 1.5, 0.2, False, 2, [1])
    yield ops.lora_linear_fwd, (x, w.t().contiguous(), None, a, bb, SEED, 1.5, 0.0, True, 2, [1])
    with torch.no_grad():
        y, s = lk.lora_linear_fwd(x, w, b, a, bb, SEED, 1.5, 0.2, False, 2, [1])
    g = torch.randn_like(y)
    yield ops.lora_linear_bwd, (g, x.detach(), w, a.detach(), bb.detach(), s, SEED, 1.5, 0.2,
                                False, 2, [1], [True, False, True, True, True])
    idx = torch.tensor([1, 0, 3, 3])
    ew, ea, eb = torch.randn(4, 3), torch.randn(2, 4, requires_grad=True), \
        torch.randn(3, 2, requires_grad=True)
    yield ops.lora_embedding_fwd, (idx, ew, ea, eb, 0.5, 3)
    with torch.no_grad():
        ey, es = lk.lora_embedding_fwd(idx, ew, ea, eb, 0.5, 3)
    yield ops.lora_embedding_bwd, (torch.randn_like(ey), idx, ew, ea.detach(), eb.detach(), es,
                                   0.5, 3, [False, True, True])
    yield ops.merge_, (torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2), 0.5, False, 1, [0])
    yield ops.unmerge_, (torch.randn(5, 4), torch.randn(2, 5), torch.randn(4, 2), 0.5, True, 1, [0])
    yield ops.merged_weight, (torch.randn(4, 3, 3, requires_grad=True),
                              torch.randn(6, 9, requires_grad=True),
                              torch.randn(4, 6, requires_grad=True), 0.5)
    yield ops.dropout, (torch.randn(3, 10, requires_grad=True), SEED, 0.3)
    del grads


def test_opcheck(backend):
    for op, args in _opcheck_samples():
        opcheck(op, args)
