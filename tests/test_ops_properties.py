"""Random shapes, groups and dropout (hypothesis): every backend equals the reference."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from lora_kernels import backends, reference as R  # noqa: E402
import lora_kernels  # noqa: E402

lk = torch.ops.lora_kernels


@st.composite
def linear_cases(draw):
    num_groups = draw(st.integers(1, 3))
    groups = sorted(draw(st.sets(st.integers(0, num_groups - 1), min_size=1)))
    return dict(
        tokens=draw(st.integers(0, 70)), in_f=draw(st.integers(1, 40)),
        size=draw(st.integers(1, 9)), r=draw(st.integers(1, 5)), num_groups=num_groups,
        groups=groups, fifo=draw(st.booleans()), bias=draw(st.booleans()),
        p=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])),
        seed=draw(st.integers(-2 ** 63, 2 ** 63 - 1)),
        scaling=draw(st.floats(0.1, 4.0)))


@pytest.mark.parametrize("name", [n for n in backends.NAMES if n != "reference"])
@settings(max_examples=40, deadline=None)
@given(case=linear_cases())
def test_linear_matches_reference(name, case):
    if backends.reasons(name, "cpu"):
        pytest.skip(f"{name} cannot run on cpu here")
    c = case
    g = torch.Generator().manual_seed(abs(c["seed"]) % 2 ** 31)
    out_f = c["size"] * c["num_groups"]
    e = len(c["groups"])
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rn(c["tokens"], c["in_f"])
    w = rn(c["in_f"], out_f) if c["fifo"] else rn(out_f, c["in_f"])
    b = rn(out_f) if c["bias"] else None
    a, bb = rn(c["r"] * e, c["in_f"]), rn(c["size"] * e, c["r"])
    seed = torch.tensor(c["seed"], dtype=torch.int64)
    args = (seed, c["scaling"], c["p"], c["fifo"], c["num_groups"], c["groups"])
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    with lora_kernels.use_backend(name):
        y, _ = lk.lora_linear_fwd(*leaves, *args)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        y.backward(gy)
    ref = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, a, bb)]
    y_ref = R.lora_linear(*ref, c["scaling"], c["p"], seed, c["fifo"], c["num_groups"],
                          c["groups"])
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    for t, u in zip(leaves, ref):
        if t is not None:
            torch.testing.assert_close(t.grad, u.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in backends.NAMES if n != "reference"])
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 40), p=st.floats(0.0, 0.99),
       seed=st.integers(-2 ** 63, 2 ** 63 - 1))
def test_dropout_mask_is_bitwise_the_reference(name, rows, cols, p, seed):
    if backends.reasons(name, "cpu"):
        pytest.skip(f"{name} cannot run on cpu here")
    x = torch.ones(rows, cols)
    s = torch.tensor(seed, dtype=torch.int64)
    with lora_kernels.use_backend(name):
        y = lk.dropout(x, s, p)
    assert torch.equal(y, R.dropout_mask((rows, cols), seed, p))
