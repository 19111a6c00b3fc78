"""Layer behaviour beyond loralib parity: input shapes, dtypes, dropout, conv shapes
loralib gets wrong, and the cases loralib cannot run."""
import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels import reference as R
from tolerances import TOL, skip_unreliable


def _nonzero_b(layer):
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 7), (2, 1, 3, 7), (0, 7), (2, 0, 7)])
def test_linear_any_leading_dims(backend, shape):
    layer = _nonzero_b(lk.Linear(7, 5, r=2, lora_alpha=3).double())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 5)
    ref = R.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 1.5)
    torch.testing.assert_close(y, ref, **TOL[torch.float64])
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_input(backend):
    layer = _nonzero_b(lk.MergedLinear(9, 6, r=2, enable_lora=[True, False, True]).double())
    base = torch.randn(4, 12, 5, dtype=torch.float64)
    x = base.transpose(1, 2)[..., 2:11]  # (4, 5, 9), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), **TOL[torch.float64])


@pytest.mark.parametrize("cls,args", [(lk.Linear, (6, 4)), (lk.MergedLinear, (6, 4)),
                                      (lk.Embedding, (6, 4)), (lk.Conv2d, (2, 3, 3))])
def test_r0_is_the_plain_layer(cls, args):
    torch.manual_seed(0)
    layer = cls(*args, r=0)
    assert not any("lora_" in n for n, _ in layer.named_parameters())
    x = torch.randint(0, 6, (5,)) if cls is lk.Embedding else \
        torch.randn(1, 2, 5, 5) if cls is lk.Conv2d else torch.randn(5, 6)
    base = layer.conv if cls is lk.Conv2d else layer
    plain = {lk.Linear: F.linear, lk.MergedLinear: F.linear}.get(cls)
    if plain is not None:
        torch.testing.assert_close(layer(x), plain(x, base.weight, base.bias))
    layer.eval()
    layer.train()


def test_merged_linear_with_every_group_disabled_runs_as_linear():
    layer = lk.MergedLinear(6, 4, r=2, enable_lora=[False, False])
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("cls,k,x_shape", [
    (lk.Conv1d, 3, (2, 4, 11)), (lk.Conv3d, 3, (1, 4, 5, 6, 5)), (lk.Conv2d, (3, 2), (2, 4, 7, 6)),
    (lk.Conv2d, 3, (2, 4, 7, 6)), (lk.Conv3d, (1, 2, 3), (1, 4, 3, 4, 5))])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_lora_shapes_fit_every_kernel(backend, cls, k, x_shape, groups):
    layer = _nonzero_b(cls(4, 6, k, r=2, lora_alpha=4, groups=groups).double())
    kk = (k,) * (len(x_shape) - 2) if isinstance(k, int) else k
    assert layer.lora_A.shape == (2 * kk[0], 4 * kk[0])
    assert layer.lora_B.shape[0] * layer.lora_A.shape[1] == layer.conv.weight.numel()
    x = torch.randn(x_shape, dtype=torch.float64)
    w = layer.conv.weight + 2.0 * (layer.lora_B @ layer.lora_A).view(layer.conv.weight.shape)
    expected = layer.conv._conv_forward(x, w, layer.conv.bias)
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float64])
    layer.eval()
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float64])


def test_conv_applies_its_dropout(backend):
    layer = _nonzero_b(lk.Conv2d(3, 4, 3, r=2, lora_dropout=0.5).double())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    seed = lk.functional.draw_seed("cpu")
    delta = layer.scaling * (layer.lora_B @ layer.lora_A).view(layer.conv.weight.shape)
    expected = layer.conv(x) + layer.conv._conv_forward(R.dropout(x, seed, 0.5), delta, None)
    torch.testing.assert_close(y, expected, **TOL[torch.float64])
    layer.eval()
    torch.testing.assert_close(layer(x), layer.conv._conv_forward(
        x, layer.conv.weight, layer.conv.bias), **TOL[torch.float64])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_linear_dropout_matches_reference_in_train_and_is_off_in_eval(backend, p):
    layer = _nonzero_b(lk.Linear(10, 6, r=3, lora_dropout=p, merge_weights=False).double())
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.manual_seed(9)
    y = layer(x)
    torch.manual_seed(9)
    seed = lk.functional.draw_seed("cpu") if p else 0
    expected = R.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                             layer.scaling, p, seed)
    torch.testing.assert_close(y, expected, **TOL[torch.float64])
    layer.eval()
    expected = R.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                             layer.scaling)
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cls,args,kw", [(lk.Linear, (16, 12), {}),
                                         (lk.MergedLinear, (16, 12), dict(enable_lora=[1, 0, 1])),
                                         (lk.Embedding, (16, 12), {})])
def test_half_precision_layers(backend, dtype, cls, args, kw):
    skip_unreliable(backend, dtype)
    torch.manual_seed(0)
    layer = _nonzero_b(cls(*args, r=4, lora_alpha=8, **kw))
    with torch.no_grad():
        layer.lora_B.mul_(0.1)
    x = torch.randint(0, 16, (3, 5)) if cls is lk.Embedding else torch.randn(3, 5, 16)
    ref = layer.double()(x if cls is lk.Embedding else x.double())
    low = layer.to(dtype)
    y = low(x if cls is lk.Embedding else x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    y.float().sum().backward()
    assert low.lora_A.grad.dtype == dtype and torch.isfinite(low.lora_A.grad.float()).all()
    low.eval()
    torch.testing.assert_close(low(x if cls is lk.Embedding else x.to(dtype)).double(), ref,
                               **TOL[dtype])


def test_unfrozen_weight_gets_its_gradient(backend):
    layer = _nonzero_b(lk.Linear(5, 4, r=2, fan_in_fan_out=True).double())
    layer.weight.requires_grad_(True)
    x = torch.randn(3, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    R.lora_linear(x, w, layer.bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(),
                  layer.scaling, fan_in_fan_out=True).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, **TOL[torch.float64])


def test_merge_unmerge_round_trip(backend):
    layer = _nonzero_b(lk.Linear(33, 17, r=4, lora_alpha=8))
    w0 = layer.weight.detach().clone()
    for _ in range(3):
        layer.eval()
        assert not torch.equal(layer.weight, w0)
        layer.train()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-5)


def test_autocast_runs_the_op_in_the_autocast_dtype(backend):
    skip_unreliable(backend, torch.bfloat16)
    layer = _nonzero_b(lk.MergedLinear(16, 12, r=4, enable_lora=[True, False, True]))
    x = torch.randn(5, 16)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, **TOL[torch.bfloat16])
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
