"""WrappedLinear around a base module (bitsandbytes ones: tests/test_qlora.py):
outputs and gradients against the reference in float64, dropout, r=0,
dtypes, no merge, bad arguments."""
import pytest
import torch
import torch.nn as nn

from lora_kernels import WrappedLinear, reference


class Scaled(nn.Linear):
    """A base with its own forward (as a quantized layer has)."""

    def forward(self, x):
        return super().forward(x) * 0.75


def make(r=4, p=0.0, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    base = Scaled(13, 7, dtype=dtype).requires_grad_(False)
    layer = WrappedLinear(base, r=r, lora_alpha=8, lora_dropout=p, dtype=dtype, **kw)
    if r:
        nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("shape", [(5, 13), (2, 3, 13), (0, 13)], ids=str)
def test_matches_reference_float64(shape):
    layer = make()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    xr = x.detach().clone().requires_grad_()
    A, B = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    want = layer.base_layer(xr) + reference.lora_linear(
        xr, torch.zeros(7, 13, dtype=torch.float64), None, A, B, layer.scaling, 0.0, False)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    for got, ref in ((x.grad, xr.grad), (layer.lora_A.grad, A.grad),
                     (layer.lora_B.grad, B.grad)):
        torch.testing.assert_close(got, ref)
    assert layer.base_layer.weight.grad is None


def test_dropout_train_and_eval_no_merge():
    layer = make(p=0.5)
    x = torch.randn(64, 13, dtype=torch.float64)
    w = layer.base_layer.weight.clone()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), y1, atol=0, rtol=0)  # the seed decides the mask
    layer.eval()
    assert not layer.merged and torch.equal(layer.base_layer.weight, w)
    y_eval = layer(x)
    assert not torch.allclose(y1, y_eval)
    want = layer.base_layer(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y_eval, want)


def test_float32_adapters_bf16_input():
    torch.manual_seed(0)
    base = Scaled(13, 7).to(torch.bfloat16).requires_grad_(False)
    layer = WrappedLinear(base, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(6, 13, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    want = base(x).float() + layer.scaling * x.float() @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y.float(), want, atol=5e-2, rtol=2e-2)


def test_rank_zero_is_the_base():
    layer = make(r=0)
    x = torch.randn(3, 13, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    assert not hasattr(layer, "lora_A")


@pytest.mark.parametrize("kw,pattern", [
    (dict(merge_weights=True), r"merge_weights: got True, expected False for a Scaled base"),
    (dict(r=-1), r"r: got -1, expected an integer >= 0"),
    (dict(lora_dropout=1.5), r"lora_dropout: got 1.5, expected a float in \[0, 1\)"),
    (dict(dtype=torch.int8), r"dtype: got torch.int8, expected a floating torch.dtype"),
])
def test_bad_arguments(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        WrappedLinear(Scaled(4, 4), **{"r": 2, **kw})


def test_base_without_features_and_merge_refused():
    with pytest.raises(ValueError, match=r"base_layer: got a ReLU without positive integer "
                                         r"in_features/out_features"):
        WrappedLinear(nn.ReLU(), r=2)
    with pytest.raises(ValueError, match=r"base_layer: got str, expected an nn.Module"):
        WrappedLinear("linear", r=2)
    layer = make()
    with pytest.raises(ValueError, match=r"merging ΔW into a Scaled base is refused"):
        layer._apply_delta(+1)
