"""Our layers against loralib 0.1.2: init, outputs, gradients, merge, checkpoints."""
import copy
import io
import pickle

import pytest
import torch

import lora_kernels as lk

loralib = pytest.importorskip("loralib")

# (class name, args, kwargs, input maker) — shapes loralib handles correctly.
CASES = {
    "linear": ("Linear", (7, 5), dict(r=3, lora_alpha=4), lambda: torch.randn(2, 3, 7)),
    "linear_bias_off": ("Linear", (9, 6), dict(r=2, lora_alpha=1, bias=False),
                        lambda: torch.randn(4, 9)),
    "linear_fifo": ("Linear", (7, 5), dict(r=3, lora_alpha=4, fan_in_fan_out=True),
                    lambda: torch.randn(3, 7)),
    "linear_r0": ("Linear", (7, 5), dict(r=0), lambda: torch.randn(3, 7)),
    "merged": ("MergedLinear", (7, 12), dict(r=2, lora_alpha=3, enable_lora=[True, False, True]),
               lambda: torch.randn(2, 5, 7)),
    "merged_fifo": ("MergedLinear", (7, 12), dict(r=2, lora_alpha=3, fan_in_fan_out=True,
                                                  enable_lora=[False, True, False]),
                    lambda: torch.randn(5, 7)),
    "merged_all": ("MergedLinear", (10, 8), dict(r=1, enable_lora=[True, True]),
                   lambda: torch.randn(3, 10)),
    "embedding": ("Embedding", (11, 6), dict(r=3, lora_alpha=2),
                  lambda: torch.randint(0, 11, (2, 3))),
    "embedding_pad": ("Embedding", (11, 6), dict(r=3, lora_alpha=2, padding_idx=2),
                      lambda: torch.tensor([[2, 1, 2, 10], [0, 2, 5, 5]])),
    "conv2d": ("Conv2d", (3, 4, 3), dict(r=2, lora_alpha=2), lambda: torch.randn(2, 3, 6, 6)),
    "conv2d_groups": ("Conv2d", (4, 6, 3), dict(r=2, groups=2, padding=1),
                      lambda: torch.randn(1, 4, 5, 5)),
    "conv1d_k1": ("Conv1d", (3, 4, 1), dict(r=2), lambda: torch.randn(2, 3, 9)),
    "conv3d_k1": ("Conv3d", (3, 4, 1), dict(r=2), lambda: torch.randn(1, 3, 3, 4, 5)),
}


def _pair(case, dtype=torch.float64):
    name, args, kwargs, make_x = CASES[case]
    torch.manual_seed(0)
    theirs = getattr(loralib, name)(*args, **kwargs).to(dtype)
    torch.manual_seed(0)
    ours = getattr(lk, name)(*args, **kwargs).to(dtype)
    return theirs, ours, make_x


def _randomise_lora(*modules):
    with torch.no_grad():
        for m in modules:
            gen = torch.Generator().manual_seed(1)
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _x(make_x, dtype=torch.float64):
    torch.manual_seed(5)
    x = make_x()
    return x.to(dtype) if x.is_floating_point() else x


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_parameters(case):
    theirs, ours, _ = _pair(case, torch.float32)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for (n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert p.requires_grad == q.requires_grad, n


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_backward_equal_loralib(case, backend):
    theirs, ours, make_x = _pair(case)
    _randomise_lora(theirs, ours)
    x = _x(make_x)
    xa = x.clone().requires_grad_(x.is_floating_point())
    xb = x.clone().requires_grad_(x.is_floating_point())
    ya, yb = theirs(xa), ours(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    if x.is_floating_point():
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)
    for (n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_merges_like_loralib(case, backend):
    theirs, ours, make_x = _pair(case)
    _randomise_lora(theirs, ours)
    x = _x(make_x)
    y_train = ours(x)
    theirs.eval()
    ours.eval()
    assert ours.merged == theirs.merged
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x), y_train, rtol=1e-10, atol=1e-10)
    ours.eval()  # idempotent
    torch.testing.assert_close(ours(x), y_train, rtol=1e-10, atol=1e-10)
    theirs.train()
    ours.train()
    assert not ours.merged
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x), y_train, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["linear", "merged", "embedding", "conv2d"])
def test_merge_weights_false_never_merges(case):
    name, args, kwargs, make_x = CASES[case]
    layer = getattr(lk, name)(*args, merge_weights=False, **kwargs)
    _randomise_lora(layer)  # a non-zero ΔW, so a merge would show in the weight
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer.eval()
    assert not layer.merged
    for n, p in layer.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_load_both_ways(case):
    theirs, ours, make_x = _pair(case)
    _randomise_lora(theirs)
    x = _x(make_x)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    # and back, through a file
    _randomise_lora(ours)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(1.5)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    theirs.load_state_dict(torch.load(buf))
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["linear", "merged", "embedding", "conv2d", "linear_fifo"])
def test_checkpoint_of_a_merged_layer_holds_the_unmerged_weight(case):
    _, ours, make_x = _pair(case)
    _randomise_lora(ours)
    x = _x(make_x)
    train_sd = copy.deepcopy(ours.state_dict())
    ours.eval()
    eval_sd = ours.state_dict()
    for k in train_sd:
        torch.testing.assert_close(eval_sd[k], train_sd[k], rtol=1e-12, atol=1e-12)
    # Loading new LoRA tensors into a merged layer re-merges with them.
    _, fresh, _ = _pair(case)
    _randomise_lora(fresh)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if "lora_" in n:
                p.mul_(-2.0)
    fresh_y = fresh(x)
    ours.load_state_dict(lk.lora_state_dict(fresh), strict=False)
    assert ours.merged
    torch.testing.assert_close(ours(x), fresh_y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["linear", "merged", "conv2d", "embedding"])
def test_wrong_checkpoint_shapes_change_nothing(case):
    _, ours, _ = _pair(case)
    before = copy.deepcopy(ours.state_dict())
    bad = {k: v.clone() + 1 for k, v in before.items()}
    bad["lora_A"] = torch.zeros(ours.lora_A.shape[0] + 1, ours.lora_A.shape[1],
                                dtype=ours.lora_A.dtype)
    with pytest.raises(RuntimeError, match=r"lora_A: checkpoint shape"):
        ours.load_state_dict(bad)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_pickle_and_deepcopy(case):
    _, ours, make_x = _pair(case)
    _randomise_lora(ours)
    x = _x(make_x)
    y = ours(x)
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)


def test_merged_linear_index_buffer_is_not_persistent_and_follows_to():
    layer = lk.MergedLinear(8, 6, r=2, enable_lora=[True, False, True])
    assert "lora_ind" not in layer.state_dict()
    assert layer.lora_ind.tolist() == [True, True, False, False, True, True]
    assert layer.to("meta").lora_ind.device.type == "meta"


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_and_state_dict_match_loralib(bias):
    def model(lib):
        torch.manual_seed(0)
        return torch.nn.Sequential(lib.Linear(4, 5, r=2), torch.nn.Linear(5, 5),
                                   lib.MergedLinear(5, 6, r=1, enable_lora=[True, False]),
                                   lib.Linear(6, 3, r=0))
    a, b = model(loralib), model(lk)
    loralib.mark_only_lora_as_trainable(a, bias)
    lk.mark_only_lora_as_trainable(b, bias)
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == \
        [(n, p.requires_grad) for n, p in b.named_parameters()]
    sa, sb = loralib.lora_state_dict(a, bias), lk.lora_state_dict(b, bias)
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
