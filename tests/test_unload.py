"""merge_and_unload: LoRA layers become plain torch modules holding W + ΔW in W's storage."""
import math

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.adalora import SVDLinear
from lora_kernels.inject import CONFIG_ATTR, inject
from lora_kernels.unload import merge_and_unload
from lora_kernels.wrapped import WrappedLinear

F64 = dict(dtype=torch.float64)
CLOSE = dict(rtol=1e-12, atol=1e-12)
EXACT = dict(rtol=0, atol=0)


def randomise_lora(model, seed=3, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def no_lora_left(model):
    return not any("lora_" in n for n, _ in model.named_parameters()) \
        and not any(isinstance(m, lk.LoRALayer) for m in model.modules())


def weight_of(layer):
    return layer.conv.weight if isinstance(layer, lk.ConvLoRA) else layer.weight


def tokens(n):
    return torch.tensor([[0, 1, 2, n - 1], [3, 0, n - 2, 1]])


# name: (LoRA layer factory, input factory, plain type)
LAYERS = {
    "linear": (lambda: lk.Linear(5, 4, r=2, lora_alpha=3),
               lambda: torch.randn(3, 5, **F64), nn.Linear),
    "linear_fan_in_fan_out": (lambda: lk.Linear(5, 4, r=2, lora_alpha=3, fan_in_fan_out=True),
                              lambda: torch.randn(2, 3, 5, **F64), nn.Linear),
    "linear_no_bias": (lambda: lk.Linear(5, 4, r=3, bias=False),
                       lambda: torch.randn(3, 5, **F64), nn.Linear),
    "linear_no_merge_weights": (lambda: lk.Linear(5, 4, r=2, merge_weights=False),
                                lambda: torch.randn(3, 5, **F64), nn.Linear),
    "merged_linear": (lambda: lk.MergedLinear(5, 6, r=2, lora_alpha=4,
                                              enable_lora=[True, False, True]),
                      lambda: torch.randn(3, 5, **F64), nn.Linear),
    "merged_linear_fan_in_fan_out": (
        lambda: lk.MergedLinear(5, 6, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                fan_in_fan_out=True),
        lambda: torch.randn(3, 5, **F64), nn.Linear),
    "merged_linear_no_group": (lambda: lk.MergedLinear(5, 6, r=2, enable_lora=[False, False]),
                               lambda: torch.randn(3, 5, **F64), nn.Linear),
    "svd_linear": (lambda: SVDLinear(5, 4, r=3, lora_alpha=6),
                   lambda: torch.randn(3, 5, **F64), nn.Linear),
    "embedding": (lambda: lk.Embedding(7, 4, r=2, lora_alpha=3, padding_idx=0),
                  lambda: tokens(7), nn.Embedding),
    "conv1d": (lambda: lk.Conv1d(3, 4, 3, r=2, lora_alpha=2, padding=1),
               lambda: torch.randn(2, 3, 6, **F64), nn.Conv1d),
    "conv2d": (lambda: lk.Conv2d(3, 4, 3, r=2, lora_alpha=2, padding=1),
               lambda: torch.randn(2, 3, 5, 5, **F64), nn.Conv2d),
    "conv3d": (lambda: lk.Conv3d(2, 3, 3, r=1, lora_alpha=2),
               lambda: torch.randn(1, 2, 4, 4, 4, **F64), nn.Conv3d),
    "linear_r0": (lambda: lk.Linear(5, 4, r=0), lambda: torch.randn(3, 5, **F64), nn.Linear),
    "embedding_r0": (lambda: lk.Embedding(7, 4, r=0), lambda: tokens(7), nn.Embedding),
    "conv2d_r0": (lambda: lk.Conv2d(3, 4, 3, r=0),
                  lambda: torch.randn(1, 3, 5, 5, **F64), nn.Conv2d),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_each_layer_type(kind, mode):
    make, make_x, plain_type = LAYERS[kind]
    torch.manual_seed(0)
    layer = randomise_lora(make().double())
    x = make_x()
    with torch.no_grad():
        want_train = layer.train()(x)
        want_eval = layer.eval()(x)
    layer.train(mode == "train")
    w = weight_of(layer)
    bias = getattr(layer.conv if kind.startswith("conv") else layer, "bias", None)
    ptr, grad = w.untyped_storage().data_ptr(), w.requires_grad
    exact = mode == "eval" and (layer.merged or not layer._has_lora())

    plain = merge_and_unload(layer)

    assert type(plain) is plain_type and no_lora_left(plain)
    assert plain.training == (mode == "train")
    assert plain.weight.untyped_storage().data_ptr() == ptr
    assert plain.weight.requires_grad == grad and plain.weight.dtype == torch.float64
    if "fan_in_fan_out" not in kind:
        assert plain.weight is w
    assert getattr(plain, "bias", None) is bias
    with torch.no_grad():
        got = plain.eval()(x)
    torch.testing.assert_close(got, want_eval, **(EXACT if exact else CLOSE))
    torch.testing.assert_close(got, want_train, **CLOSE)


def test_fan_in_fan_out_gives_the_transposed_view():
    layer = randomise_lora(lk.Linear(5, 4, r=2, fan_in_fan_out=True).double()).train()
    stored = layer.weight
    plain = merge_and_unload(layer)
    assert plain.weight.shape == (4, 5) and stored.shape == (5, 4)
    assert plain.weight.data_ptr() == stored.data_ptr() and plain.weight.stride() == (1, 4)
    torch.testing.assert_close(plain.weight.detach(), stored.detach().t(), **EXACT)


def test_embedding_keeps_its_options():
    layer = lk.Embedding(9, 4, r=2, padding_idx=-2, max_norm=1.5, norm_type=3.0,
                         scale_grad_by_freq=True, sparse=True)
    plain = merge_and_unload(layer)
    assert type(plain) is nn.Embedding
    assert (plain.num_embeddings, plain.embedding_dim, plain.padding_idx) == (9, 4, 7)
    assert (plain.max_norm, plain.norm_type, plain.scale_grad_by_freq, plain.sparse) == \
        (1.5, 3.0, True, True)


def test_conv_gives_back_its_own_conv():
    layer = randomise_lora(lk.Conv2d(3, 4, (3, 1), r=2, stride=2, groups=1).double()).train()
    inner = layer.conv
    assert merge_and_unload(layer) is inner


def test_already_merged_is_not_merged_again():
    torch.manual_seed(0)
    layer = randomise_lora(lk.Linear(5, 4, r=2, lora_alpha=6).double())
    w0 = layer.weight.detach().clone()
    want = w0 + 3.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    layer.eval()
    assert layer.merged
    plain = merge_and_unload(layer)
    torch.testing.assert_close(plain.weight.detach(), want, **CLOSE)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_old_layer_never_unmerges_the_shared_weight(mode):
    layer = randomise_lora(lk.Linear(5, 4, r=2).double()).train(mode == "train")
    plain = merge_and_unload(nn.Sequential(layer))[0]
    merged_w = plain.weight.detach().clone()
    layer.train().eval().train()
    torch.testing.assert_close(plain.weight.detach(), merged_w, **EXACT)
    x = torch.randn(3, 5, **F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), **EXACT)


def test_unmerged_layer_in_eval_mode_is_merged():
    torch.manual_seed(0)
    layer = randomise_lora(lk.Linear(5, 4, r=2, lora_alpha=6, merge_weights=False).double())
    layer.eval()
    w0 = layer.weight.detach().clone()
    assert not layer.merged
    plain = merge_and_unload(layer)
    want = w0 + 3.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(plain.weight.detach(), want, **CLOSE)
    assert not plain.training


class ScaledLinear(lk.Linear):
    """A subclass with its own merge (as DoRA has): W ← m·(W + s·B·A)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_magnitude = nn.Parameter(torch.full((self.out_features, 1), 2.0))

    def _apply_delta(self, sign):
        delta = self.scaling * self.lora_B.detach() @ self.lora_A.detach()
        m = self.lora_magnitude.detach()
        with torch.no_grad():
            if sign > 0:
                self.weight.copy_(m * (self.weight + delta))
            else:
                self.weight.copy_(self.weight / m - delta)


def test_subclass_is_merged_through_its_own_apply_delta():
    torch.manual_seed(0)
    layer = randomise_lora(ScaledLinear(5, 4, r=2).double()).train()
    with torch.no_grad():
        layer.lora_magnitude.fill_(2.0)
    want = 2.0 * (layer.weight.detach() + 0.5 * layer.lora_B.detach() @ layer.lora_A.detach())
    plain = merge_and_unload(nn.Sequential(layer))[0]
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain.weight.detach(), want, **CLOSE)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.out = nn.Linear(8, 8, bias=False)

    def forward(self, h):
        h = torch.relu(self.proj(h))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(h)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.blocks = nn.Sequential(Block(), Block())
        self.alias = self.blocks[1].proj        # the same layer under two names
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        return self.head(self.alias(self.blocks(self.emb(idx))))


def injected_net(mode):
    torch.manual_seed(0)
    model = Net().double()
    inject(model, target_modules=["emb", "proj", "conv", "out"], r=2, lora_alpha=4)
    model.alias = model.blocks[1].proj      # inject replaces only the names that match
    return randomise_lora(model).train(mode == "train")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_injected_nested_model(mode):
    model = injected_net(mode)
    idx = tokens(11)
    with torch.no_grad():
        want = model.eval()(idx)
    model.train(mode == "train")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lk.LoRALayer)}
    ptrs = {n: weight_of(m).untyped_storage().data_ptr() for n, m in layers.items()}

    out = merge_and_unload(model)

    assert out is model and no_lora_left(model)
    assert CONFIG_ATTR not in model.__dict__
    assert model.alias is model.blocks[1].proj and type(model.alias) is nn.Linear
    for name, ptr in ptrs.items():
        plain = model.get_submodule(name)
        assert plain.weight.untyped_storage().data_ptr() == ptr
        assert not plain.weight.requires_grad           # inject froze W; it stays frozen
        assert plain.training == (mode == "train")
    assert {type(model.get_submodule(n)) for n in ptrs} == {nn.Embedding, nn.Linear, nn.Conv1d}
    assert set(model.state_dict()) == set(Net().state_dict())
    with torch.no_grad():
        got = model.eval()(idx)
    torch.testing.assert_close(got, want, **(EXACT if mode == "eval" else CLOSE))


def test_injected_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=37, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    inject(model, target_modules=["c_attn", "c_proj", "c_fc"], r=2, lora_alpha=4)
    randomise_lora(model).train()
    idx = tokens(37)
    with torch.no_grad():
        want = model.eval()(idx).logits
    model.train()
    merge_and_unload(model)
    assert no_lora_left(model)
    assert type(model.transformer.h[0].attn.c_attn) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx).logits, want, **CLOSE)


def test_requires_grad_and_device_are_kept():
    layer = lk.Linear(4, 3, r=2)
    layer.weight.requires_grad_(True)
    plain = merge_and_unload(layer)
    assert plain.weight.requires_grad and plain.bias.requires_grad
    assert plain.weight.device.type == "cpu" and plain.weight.dtype == torch.float32
    assert not any(t.is_meta for t in plain.state_dict().values())


def test_model_without_lora_is_returned_unchanged():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    weights = [p for p in model.parameters()]
    assert merge_and_unload(model) is model
    assert list(model.parameters()) == weights


def test_wrapped_linear_without_update_gives_back_its_base():
    base = nn.Linear(4, 3)
    assert merge_and_unload(nn.Sequential(WrappedLinear(base, r=0)))[0] is base


def snapshot(model):
    return ([type(m) for m in model.modules()],
            {n: (p, p.detach().clone()) for n, p in model.named_parameters()},
            [getattr(m, "merged", None) for m in model.modules()])


def assert_unchanged(model, snap):
    types, params, merged = snap
    assert [type(m) for m in model.modules()] == types
    assert [getattr(m, "merged", None) for m in model.modules()] == merged
    now = dict(model.named_parameters())
    assert list(now) == list(params)
    for name, (p, value) in params.items():
        assert now[name] is p
        torch.testing.assert_close(p.detach(), value, **EXACT)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wrapped_linear_is_refused_before_anything_changes(mode):
    torch.manual_seed(0)
    model = nn.Sequential(lk.Linear(4, 4, r=2), nn.Sequential(WrappedLinear(nn.Linear(4, 4), r=2)))
    randomise_lora(model).train(mode == "train")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"^model: cannot merge and unload, nothing was changed: "
                                         r"'1\.0' is a WrappedLinear around a Linear, expected"):
        merge_and_unload(model)
    assert_unchanged(model, snap)


def test_quantized_wrapped_linear_is_refused_before_anything_changes():
    from bnb_support import bnb_reason
    reason = bnb_reason()
    if reason is not None:
        pytest.skip(reason)
    import bitsandbytes as bnb
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    lin = lin.to("cpu")
    model = nn.Sequential(lk.Linear(64, 64, r=2), WrappedLinear(lin, r=4)).train()
    randomise_lora(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'1' is a WrappedLinear around a quantized Linear4bit, "
                                         r"expected a layer whose W can take ΔW: .*rounds? "
                                         r"most of a small ΔW away.*dequantize"):
        merge_and_unload(model)
    assert_unchanged(model, snap)


class Unknown(lk.LoRALayer, nn.Module):
    def __init__(self):
        nn.Module.__init__(self)
        lk.LoRALayer.__init__(self, r=2, lora_alpha=2, lora_dropout=0.0, merge_weights=True)
        self.lora_A = nn.Parameter(torch.zeros(2, 3))


class ForeignLoRA(nn.Module):
    """Holds lora_A/lora_B as a module dict, as PEFT's layers do."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(3, 3)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(3, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 3, bias=False)})


def test_unknown_lora_layers_are_refused_before_anything_changes():
    loralib = pytest.importorskip("loralib")
    model = nn.Sequential(randomise_lora(lk.Linear(3, 3, r=2)), Unknown(), ForeignLoRA(),
                          loralib.Linear(3, 3, r=2))
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        merge_and_unload(model)
    msg = str(info.value)
    assert "'1' is a Unknown, a LoRALayer with no known plain counterpart" in msg
    assert "'2' is a test_unload.ForeignLoRA, expected a lora_kernels LoRA layer" in msg
    assert "'3' is a loralib.layers.Linear" in msg
    assert_unchanged(model, snap)


def test_a_failing_merge_takes_the_earlier_merges_out_again():
    class Failing(lk.Linear):
        def _apply_delta(self, sign):
            raise RuntimeError("merge failed")

    torch.manual_seed(0)
    model = randomise_lora(nn.Sequential(lk.Linear(4, 4, r=2), Failing(4, 4, r=2))).train()
    w0 = model[0].weight.detach().clone()
    types = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match="merge failed"):
        merge_and_unload(model)
    assert [type(m) for m in model.modules()] == types and not model[0].merged
    torch.testing.assert_close(model[0].weight.detach(), w0, rtol=0, atol=1e-6)


def test_meta_weights_are_refused():
    layer = lk.Linear(4, 3, r=2, device="meta")
    with pytest.raises(ValueError, match=r"'0' is a Linear with weights on the meta device"):
        merge_and_unload(nn.Sequential(layer))


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match=r"model: got str, expected a torch\.nn\.Module"):
        merge_and_unload("model")


def test_scaling_matches_reference_for_merged_linear():
    torch.manual_seed(0)
    layer = randomise_lora(lk.MergedLinear(3, 6, r=1, lora_alpha=2,
                                           enable_lora=[True, False, True]).double()).train()
    w0 = layer.weight.detach().clone()
    delta = layer.merge_AB().detach() * layer.scaling
    plain = merge_and_unload(layer)
    torch.testing.assert_close(plain.weight.detach(), w0 + delta, **CLOSE)
    assert math.isclose(layer.scaling, 2.0)


def test_dora_linear_is_merged_through_its_own_merge():
    dora_layer = pytest.importorskip("lora_kernels.dora_layer")
    torch.manual_seed(0)
    layer = dora_layer.DoraLinear(5, 4, r=2, lora_alpha=4, fan_in_fan_out=True).double()
    randomise_lora(layer).train()
    x = torch.randn(3, 5, **F64)
    with torch.no_grad():
        want = layer(x)
    ptr = layer.weight.untyped_storage().data_ptr()
    plain = merge_and_unload(nn.Sequential(layer))[0]
    assert type(plain) is nn.Linear and plain.weight.untyped_storage().data_ptr() == ptr
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, **CLOSE)
