"""The GPU backends (Triton, CUDA C++) against the reference and the CPU
backend: bit-identical dropout masks, odd shapes that straddle tiles, large
ranks, determinism, and routing of CPU tensors through Triton under the
interpreter.

Each test runs for every (backend, device) pair that can run here: Triton on
CPU tensors under ``TRITON_INTERPRET=1`` (CI does: see the Makefile's test
target), and, marked ``gpu``, Triton and the CUDA C++ extension on a CUDA
device, where bf16 is checked too (the interpreter has no bf16 arithmetic).
"""
import os

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels import reference as R

SEED = torch.tensor(0x0123_4567_89AB_CDEF, dtype=torch.int64)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _pair(backend, device):
    """A (backend, device) parameter, skipped with the backend's reasons."""
    gpu = device == "cuda"
    why = ["needs a CUDA GPU"] if gpu and not torch.cuda.is_available() \
        else backends.reasons(backend, device)
    if not gpu and not INTERPRETED:
        why = ["triton on CPU tensors runs under TRITON_INTERPRET=1 only"]
    marks = ([pytest.mark.gpu] if gpu else []) + \
        ([pytest.mark.skip(reason=f"{backend} on {device}: " + "; ".join(why))] if why else [])
    return pytest.param((backend, device), id=f"{backend}-{'gpu' if gpu else 'interpreter'}",
                        marks=marks)


PAIRS = [_pair("triton", "cpu"), _pair("triton", "cuda"), _pair("cuda", "cuda")]


class _On:
    """``torch.ops.lora_kernels.<op>`` run on one backend."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        op = getattr(torch.ops.lora_kernels, name)

        def call(*args):
            with lk.use_backend(self.backend):
                return op(*args)
        return call


def _cpu_dropout(x, seed, p):
    """The CPU backend's dropout (the reference's where the extension is missing)."""
    with lk.use_backend("auto"):
        return torch.ops.lora_kernels.dropout(x.cpu(), seed.cpu(), p)


# Tolerances against the float64 reference, per dtype. On a GPU fp32 products
# may run as TF32 (10-bit mantissa: Triton unless LORA_KERNELS_TRITON_TF32=0,
# cuBLAS when torch allows it); the interpreter computes them exactly.
def _tol(dtype, device):
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-10)
    if dtype == torch.float32:
        return dict(atol=1e-4, rtol=1e-4) if device == "cpu" else dict(atol=2e-2, rtol=2e-2)
    if dtype == torch.float16:
        return dict(atol=2e-2, rtol=2e-2)
    return dict(atol=8e-2, rtol=8e-2)  # bfloat16


def _close(got, ref64, lowp_ref, dtype, device, what=""):
    """fp64/fp32: a stated tolerance. fp16/bf16: as flash-attention tests, the
    kernel's largest error against the float64 reference may be at most twice
    that of the plain PyTorch composition run in the same dtype (plus a
    rounding floor), which adapts to each shape's accumulation length."""
    got = got.double().cpu()
    if dtype in (torch.float16, torch.bfloat16):
        bound = 2 * (lowp_ref.double() - ref64).abs().max().item() \
            + (1e-3 if dtype == torch.float16 else 8e-3) * (1 + ref64.abs().max().item())
        err = (got - ref64).abs().max().item() if got.numel() else 0.0
        assert err <= bound, f"{what} {dtype}: max error {err:.3g} > {bound:.3g}"
    else:
        torch.testing.assert_close(got, ref64, **_tol(dtype, device),
                                   msg=lambda m: f"{what} {dtype}: {m}")


def _dtypes(device):
    # The interpreter has no bf16 arithmetic; bf16 is checked on a GPU.
    base = [torch.float64, torch.float32, torch.float16]
    return base if device == "cpu" else base + [torch.bfloat16]


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 37), (67, 203), (2, 0, 9), (4, 8)], ids=str)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 1.0])
def test_dropout_is_bit_identical_to_the_cpu_backend(pair, shape, p):
    backend, device = pair
    ops = _On(backend)
    for dtype in _dtypes(device):
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        got = ops.dropout(x.to(device), SEED.to(device), p).cpu()
        assert torch.equal(got, _cpu_dropout(x, SEED, p)), dtype
        if dtype != torch.bfloat16:
            assert torch.equal(got, R.dropout(x, SEED, p)), dtype


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("in_features", [8, 37, 70])
def test_forward_regenerates_the_same_mask(pair, in_features):
    """With A = I the kept product s = dropout(x)·Aᵀ is dropout(x) itself, exactly."""
    backend, device = pair
    ops = _On(backend)
    x = torch.randn(45, in_features, dtype=torch.float64)
    w = torch.randn(6, in_features, dtype=torch.float64)
    a = torch.eye(in_features, dtype=torch.float64)
    b = torch.randn(6, in_features, dtype=torch.float64)
    y, s = ops.lora_linear_fwd(*(t.to(device) for t in (x, w)), None,
                               *(t.to(device) for t in (a, b)), SEED.to(device), 1.0, 0.3,
                               False, 1, [0])
    assert torch.equal(s.cpu(), _cpu_dropout(x, SEED, 0.3))


@pytest.mark.parametrize("pair", PAIRS)
def test_backward_epilogue_drops_exactly_the_forward_mask(pair):
    """dx = g·W + m ⊙ (dS·A): with W = 0 and A = I, dx is zero exactly where m is."""
    backend, device = pair
    ops = _On(backend)
    tokens, d = 33, 27
    x = torch.randn(tokens, d, dtype=torch.float64)
    w = torch.zeros(5, d, dtype=torch.float64)
    a = torch.eye(d, dtype=torch.float64)
    b = torch.rand(5, d, dtype=torch.float64) + 0.5
    g = torch.rand(tokens, 5, dtype=torch.float64) + 0.5
    dev = [t.to(device) for t in (g, x, w, a, b)]
    _, s = ops.lora_linear_fwd(dev[1], dev[2], None, dev[3], dev[4], SEED.to(device), 1.0, 0.4,
                               False, 1, [0])
    dx, *_ = ops.lora_linear_bwd(*dev, s, SEED.to(device), 1.0, 0.4, False, 1, [0],
                                 [True, False, False, False, False])
    mask = _cpu_dropout(torch.ones(tokens, d, dtype=torch.float64), SEED, 0.4)
    assert torch.equal(dx.cpu() == 0, mask == 0)
    torch.testing.assert_close(dx.cpu(), mask * ((g @ b) @ a), atol=1e-12, rtol=1e-12)


def _linear_case(tokens, in_f, out_f, r, num_groups, groups, fifo, dtype, device, noncontig):
    gen = torch.Generator().manual_seed(tokens * 1000 + in_f)
    rn = lambda *s: (torch.randn(*s, generator=gen, dtype=torch.float64) * 0.5)  # noqa: E731
    e = len(groups)
    x = rn(tokens, in_f)
    w = rn(in_f, out_f) if fifo else rn(out_f, in_f)
    leaves64 = [x, w, rn(out_f), rn(r * e, in_f), rn(out_f // num_groups * e, r)]
    leaves = [t.to(device=device, dtype=dtype) for t in leaves64]
    if noncontig:  # x as a transposed, column-sliced view
        buf = torch.zeros(in_f + 3, tokens, device=device, dtype=dtype).t()[:, 1:in_f + 1]
        leaves[0] = buf.copy_(leaves[0])
        assert not leaves[0].is_contiguous()
    return ([t.requires_grad_() for t in leaves64],
            [t.detach().requires_grad_() for t in leaves])


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("case", [
    # tokens, in, out, r, num_groups, groups, fan_in_fan_out, p, non-contiguous x
    (7, 9, 5, 3, 1, [0], False, 0.0, False),
    (53, 45, 39, 8, 3, [0, 2], True, 0.1, True),
    (19, 130, 40, 100, 1, [0], False, 0.2, False),     # rank above every rank block
    (11, 24, 30, 48, 3, [0, 1, 2], True, 0.1, False),  # r·groups = 144: three rank blocks
    (33, 20, 66, 5, 2, [1], False, 0.5, False),
], ids=str)
def test_linear_forward_and_every_gradient(pair, case):
    backend, device = pair
    tokens, in_f, out_f, r, G, groups, fifo, p, noncontig = case
    for dtype in _dtypes(device):
        ref, got = _linear_case(tokens, in_f, out_f, r, G, groups, fifo, dtype, device,
                                noncontig)
        with lk.use_backend(backend):
            y, _ = torch.ops.lora_kernels.lora_linear_fwd(*got, SEED.to(device), 1.3, p, fifo,
                                                           G, groups)
            g = torch.randn(y.shape, dtype=torch.float64)
            y.backward(g.to(device=device, dtype=dtype))
        y_ref = R.lora_linear(*ref, 1.3, p, SEED, fifo, G, groups)
        y_ref.backward(g)
        # The same composition in the low dtype (on the CPU), for the error bound.
        low = [u.detach().to(dtype).requires_grad_() for u in ref]
        y_low = R.lora_linear(*low, 1.3, p, SEED, fifo, G, groups)
        y_low.backward(g.to(dtype))
        _close(y, y_ref, y_low, dtype, device, "y")
        for name, t, u, v in zip("x weight bias lora_A lora_B".split(), got, ref, low):
            _close(t.grad, u.grad, v.grad, dtype, device, f"d{name}")


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("fifo,G,groups", [(False, 1, [0]), (True, 3, [0, 2])])
def test_merge_unmerge_in_place(pair, fifo, G, groups):
    backend, device = pair
    for dtype in _dtypes(device):
        gen = torch.Generator().manual_seed(3)
        out_f, in_f, r = 36, 29, 6
        w = torch.randn(*((in_f, out_f) if fifo else (out_f, in_f)), generator=gen,
                        dtype=torch.float64)
        a = torch.randn(r * len(groups), in_f, generator=gen, dtype=torch.float64)
        b = torch.randn(out_f // G * len(groups), r, generator=gen, dtype=torch.float64)
        wd = w.to(device=device, dtype=dtype, copy=True)
        ptr = wd.data_ptr()
        with lk.use_backend(backend):
            torch.ops.lora_kernels.merge_(wd, a.to(device, dtype), b.to(device, dtype), 0.7,
                                          fifo, G, groups)
            assert wd.data_ptr() == ptr
            torch.testing.assert_close(wd.double().cpu(),
                                       R.merged_weight(w, a, b, 0.7, fifo, G, groups),
                                       **_tol(dtype, "cpu"))
            torch.ops.lora_kernels.unmerge_(wd, a.to(device, dtype), b.to(device, dtype), 0.7,
                                            fifo, G, groups)
        torch.testing.assert_close(wd.double().cpu(), w.to(dtype).double(), **_tol(dtype, "cpu"))


@pytest.mark.parametrize("pair", PAIRS)
def test_embedding_forward_and_gradients(pair):
    backend, device = pair
    for dtype in _dtypes(device):
        gen = torch.Generator().manual_seed(5)
        num, dim, r = 41, 35, 7
        idx = torch.randint(0, num, (3, 23), generator=gen)
        leaves64 = [torch.randn(num, dim, generator=gen, dtype=torch.float64),
                    torch.randn(r, num, generator=gen, dtype=torch.float64),
                    torch.randn(dim, r, generator=gen, dtype=torch.float64)]
        ref = [t.clone().requires_grad_(i > 0) for i, t in enumerate(leaves64)]
        got = [t.to(device, dtype).requires_grad_(i > 0) for i, t in enumerate(leaves64)]
        with lk.use_backend(backend):
            y = lk.functional.lora_embedding(idx.to(device), *got, 0.9, padding_idx=4)
            g = torch.randn(y.shape, dtype=torch.float64)
            y.backward(g.to(device, dtype))
        y_ref = R.lora_embedding(idx, *ref, 0.9, padding_idx=4)
        y_ref.backward(g)
        tol = _tol(dtype, device)
        torch.testing.assert_close(y.double().cpu(), y_ref, **tol)
        torch.testing.assert_close(got[1].grad.double().cpu(), ref[1].grad, **tol)
        torch.testing.assert_close(got[2].grad.double().cpu(), ref[2].grad, **tol)


@pytest.mark.parametrize("pair", PAIRS)
def test_gradients_are_deterministic(pair):
    """Fixed-order partial sums, no atomics: two backward passes agree bit for bit."""
    backend, device = pair
    torch.manual_seed(0)
    layer = lk.MergedLinear(40, 60, r=4, lora_dropout=0.1,
                            enable_lora=[True, False, True]).to(device)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 37, 40, device=device)
    grads = []
    with lk.use_backend(backend):
        for _ in range(2):
            layer.zero_grad()
            torch.manual_seed(1)
            layer(x).square().sum().backward()
            grads.append([p.grad.clone() for p in (layer.lora_A, layer.lora_B)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or bool(backends.reasons("cuda", "cuda")),
                    reason="needs a CUDA GPU and the CUDA extension")
def test_cuda_backend_accepts_a_seed_on_the_cpu():
    x = torch.randn(67, 203, dtype=torch.float64)
    got = _On("cuda").dropout(x.cuda(), SEED, 0.3).cpu()
    assert torch.equal(got, _cpu_dropout(x, SEED, 0.3))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_env_routes_cpu_tensors_through_the_triton_kernels(monkeypatch):
    """LORA_KERNELS_BACKEND=triton with TRITON_INTERPRET=1: a CPU layer's forward
    and backward run the Triton ops."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    tb = backends.get("triton")
    calls = []
    for name in ("lora_linear_fwd", "lora_linear_bwd"):
        real = getattr(tb, name)
        monkeypatch.setattr(tb, name, lambda *a, _n=name, _f=real: (calls.append(_n), _f(*a))[1])
    assert backends.resolved_name("cpu") == "triton"
    layer = lk.Linear(12, 10, r=4, lora_dropout=0.1)
    torch.nn.init.normal_(layer.lora_B)
    layer(torch.randn(3, 5, 12)).sum().backward()
    assert calls == ["lora_linear_fwd", "lora_linear_bwd"]
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiler", ["record", "inductor"])
def test_compile_traces_into_the_triton_kernels(compiler):
    """On CUDA, torch.compile sees the Triton kernels (triton_op + wrap_triton)
    instead of an opaque lora_kernels op, and computes the same gradients."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        lk.Embedding(50, 32, r=4), lk.Linear(32, 48, r=4, lora_dropout=0.1),
        lk.MergedLinear(48, 48, r=2, lora_dropout=0.1, enable_lora=[True, False, True])).cuda()
    for m in model:
        torch.nn.init.normal_(m.lora_B)
    idx = torch.randint(0, 50, (4, 16), device="cuda")
    rec = AotEagerAndRecordGraphs()
    with lk.use_backend("triton"):
        compiled = torch.compile(model, backend=rec if compiler == "record" else "inductor",
                                 fullgraph=True)
        torch.manual_seed(1)
        compiled(idx).square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        torch.manual_seed(1)
        model(idx).square().sum().backward()
    eager = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    if compiler == "record":
        fw, bw = rec.fw_graphs[0].code, rec.bw_graphs[0].code
        assert "triton_kernel_wrapper" in fw and "triton_kernel_wrapper" in bw
        assert "lora_kernels.lora_linear" not in fw + bw
