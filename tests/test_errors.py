"""Bad input: a clear error naming the argument and what was expected, nothing changed."""
import copy

import pytest
import torch

import lora_kernels as lk


@pytest.mark.parametrize("make", [
    lambda: lk.Linear(4, 3, r=-1),
    lambda: lk.MergedLinear(4, 3, r=-2, enable_lora=[True]),
    lambda: lk.Embedding(4, 3, r=-1),
    lambda: lk.Conv2d(2, 3, 3, r=-1),
    lambda: lk.Linear(4, 3, r=1.5),
])
def test_negative_or_non_integer_rank(make):
    with pytest.raises(ValueError, match=r"r: got .*expected an integer >= 0"):
        make()


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_outside_unit_interval(p):
    for make in (lambda: lk.Linear(4, 3, r=1, lora_dropout=p),
                 lambda: lk.MergedLinear(4, 3, r=1, lora_dropout=p, enable_lora=[True]),
                 lambda: lk.Conv1d(2, 3, 1, r=1, lora_dropout=p)):
        with pytest.raises(ValueError, match=r"lora_dropout: got .*expected a float in \[0, 1\)"):
            make()


def test_enable_lora_must_divide_out_features():
    with pytest.raises(ValueError, match=r"enable_lora: got 2 groups.*out_features=3"):
        lk.MergedLinear(4, 3, r=1, enable_lora=[True, False])


def test_wrong_in_features():
    layer = lk.Linear(4, 3, r=2)
    with pytest.raises(ValueError, match=r"x.shape: got \(2, 5\), expected \(\.\.\., 4\)"):
        layer(torch.randn(2, 5))


def test_dtype_mismatch():
    layer = lk.Linear(4, 3, r=2)
    with pytest.raises(ValueError, match=r"weight.dtype: got torch.float32, expected x's dtype "
                                         r"torch.float64"):
        layer(torch.randn(2, 4, dtype=torch.float64))


def test_device_mismatch():
    layer = lk.Linear(4, 3, r=2)
    with pytest.raises(ValueError, match=r"weight.device: got cpu, expected x's device meta"):
        layer(torch.randn(2, 4, device="meta"))


def test_embedding_index_out_of_range():
    layer = lk.Embedding(5, 3, r=2)
    with pytest.raises(ValueError, match=r"indices: got values in \[0, 5\], expected values in "
                                         r"\[0, 4\]"):
        layer(torch.tensor([0, 5]))


@pytest.mark.parametrize("fn", [lk.mark_only_lora_as_trainable, lk.lora_state_dict])
def test_bias_mode(fn):
    model = torch.nn.Sequential(lk.Linear(4, 3, r=1), torch.nn.Linear(3, 2))
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"bias: got 'some', expected one of 'none', 'all', "
                                         r"'lora_only'"):
        fn(model, bias="some")
    with pytest.raises(NotImplementedError):  # what loralib raised
        fn(model, bias="some")
    assert [p.requires_grad for p in model.parameters()] == before


def test_wrong_checkpoint_shape_in_a_model_changes_no_lora_layer():
    model = torch.nn.Sequential(lk.Linear(4, 3, r=2), lk.Linear(3, 2, r=2))
    before = copy.deepcopy(model.state_dict())
    bad = {k: v + 1 for k, v in before.items()}
    bad["1.lora_B"] = torch.zeros(5, 2)
    with pytest.raises(RuntimeError, match=r"1.lora_B: checkpoint shape \(5, 2\), expected "
                                           r"\(2, 2\)"):
        model.load_state_dict(bad)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before["1." + k]), k


def test_functional_shape_errors():
    from lora_kernels import functional as F
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"lora_A.shape: got \(2, 3\), expected \(r\*1, 4\)"):
        F.lora_linear(x, w, None, torch.randn(2, 3), torch.randn(5, 2), 1.0)
    with pytest.raises(ValueError, match=r"lora_B.shape: got \(4, 2\), expected \(5, 2\)"):
        F.lora_linear(x, w, None, torch.randn(2, 4), torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match=r"bias.shape: got \(4,\), expected \(5,\)"):
        F.lora_linear(x, w, torch.randn(4), torch.randn(2, 4), torch.randn(5, 2), 1.0)
    with pytest.raises(ValueError, match=r"lora_A.shape"):
        F.merge_(w, torch.randn(2, 3), torch.randn(5, 2), 1.0)
    before = w.clone()
    with pytest.raises(ValueError):
        F.merge_(w, torch.randn(2, 4), torch.randn(4, 2), 1.0)
    assert torch.equal(w, before)
    # a conv weight merges as (B·A).view(W.shape); a size that does not fit is refused
    conv_w = torch.randn(6, 2, 3)
    with pytest.raises(ValueError, match=r"weight.shape: got \(6, 2, 3\), expected a 2-D "
                                         r"weight, or a conv weight of lora_B.shape\[0\]"):
        F.merge_(conv_w, torch.randn(2, 6), torch.randn(5, 2), 1.0)
    A, B = torch.randn(2, 6), torch.randn(6, 2)
    merged = conv_w.clone()
    F.merge_(merged, A, B, 0.5)
    torch.testing.assert_close(merged, conv_w + 0.5 * (B @ A).view(6, 2, 3))


def test_bad_kernel_size():
    with pytest.raises(ValueError, match=r"kernel_size: got \(3, 0\), expected an int or a tuple "
                                         r"of 2 positive ints"):
        lk.Conv2d(2, 3, (3, 0), r=1)
