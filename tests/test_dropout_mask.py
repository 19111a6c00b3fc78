"""The Philox dropout mask: known answers, statistics, and equality across backends."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_kernels
from lora_kernels import reference as R


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize("key,ctr,expected", [
    # Random123's kat_vectors for philox4x32_10.
    (0, (0, 0, 0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    (0xffffffffffffffff, (0xffffffff,) * 4, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    (0x299f31d0a4093822, (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
])
def test_philox_known_answers(key, ctr, expected):
    out = R.philox4x32(key, *(_t(c) for c in ctr))
    assert tuple(int(o) for o in out) == expected


def test_lane_layout_known_answers():
    # Row 0 of a 1×16 matrix is counters 0 and 1; lanes are lo/hi halves of o0..o3.
    lanes = R.dropout_lanes(1, 16, 42)[0].tolist()
    assert lanes == [61523, 40170, 18747, 30709, 20653, 4799, 46039, 22338,
                     8487, 64731, 27901, 21434, 23150, 33679, 1787, 29774]
    o = [int(v) for v in R.philox4x32(42, _t(1))]
    assert lanes[8:] == [w >> s & 0xFFFF for w in o for s in (0, 16)]
    # Each row starts a new counter: row 1 of a 2×3 matrix is counter 1.
    assert R.dropout_lanes(2, 3, 42)[1].tolist() == lanes[8:11]


def test_mask_known_answer():
    m = R.dropout_mask((2, 11), 42, 0.5)
    assert (m > 0).int().tolist() == [[1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0],
                                      [0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0]]
    assert set(m.unique().tolist()) == {0.0, 2.0}


def test_negative_seed_uses_its_64_bit_pattern():
    assert torch.equal(R.dropout_lanes(3, 9, -1), R.dropout_lanes(3, 9, (1 << 64) - 1))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_fraction_dropped_and_unbiased(p):
    n = 400 * 1000
    m = R.dropout_mask((400, 1000), 1234, p, torch.float64)
    frac = (m == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - R.dropout_threshold(p) / 65536) < 5 * sigma
    # E[mask] = 1 exactly; the sample mean is within 5 sigma of it.
    scale = R.dropout_keep_scale(p)
    assert abs(m.mean().item() - 1.0) < 5 * scale * sigma
    assert R.dropout_keep_scale(p) * (65536 - R.dropout_threshold(p)) == 65536


def test_seeds_differ():
    a = R.dropout_mask((64, 64), 1, 0.5)
    b = R.dropout_mask((64, 64), 2, 0.5)
    assert not torch.equal(a, b)
    assert torch.equal(a, R.dropout_mask((64, 64), 1, 0.5))


@pytest.mark.parametrize("shape", [(5, 13), (3, 2, 8), (1, 1), (0, 9), (7,)])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.75])
def test_dropout_op_matches_reference_bitwise(backend, shape, p):
    x = torch.randn(shape, dtype=torch.float32)
    seed = torch.tensor(987654321987, dtype=torch.int64)
    y = torch.ops.lora_kernels.dropout(x, seed, p)
    assert torch.equal(y, R.dropout(x, seed, p))


def test_triton_randint4x_is_the_same_generator():
    """tl.randint4x(seed, n) in Triton's interpreter gives our counter-n words."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from lora_kernels import reference as R

        @triton.jit
        def k(out, seed, N: tl.constexpr):
            off = tl.arange(0, N)
            a, b, c, d = tl.randint4x(seed, off)
            tl.store(out + off * 4 + 0, a.to(tl.int64) & 0xFFFFFFFF)
            tl.store(out + off * 4 + 1, b.to(tl.int64) & 0xFFFFFFFF)
            tl.store(out + off * 4 + 2, c.to(tl.int64) & 0xFFFFFFFF)
            tl.store(out + off * 4 + 3, d.to(tl.int64) & 0xFFFFFFFF)

        seed = 0x0123456789ABCDEF
        out = torch.zeros(64 * 4, dtype=torch.int64)
        k[(1,)](out, seed, 64)
        ref = torch.stack(R.philox4x32(seed, torch.arange(64)), -1).reshape(-1)
        assert torch.equal(out, ref), (out[:8], ref[:8])
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_seed_comes_from_the_default_generator():
    layer = lora_kernels.Linear(16, 8, r=4, lora_dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 16)
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    y3 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_regenerates_the_mask(reentrant):
    from torch.utils.checkpoint import checkpoint
    layer = lora_kernels.Linear(16, 8, r=4, lora_dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(3)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(3)
    checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    for g, t in zip(grads, (x, layer.lora_A, layer.lora_B)):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=0)
