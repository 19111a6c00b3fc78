"""patch_peft on LoRA Linear layers whose base lora_kernels does not compute
(a custom or hooked module standing in for a quantized one): the base runs as
its own module and lora_delta adds the branch. Outputs and every LoRA gradient
against unpatched PEFT; several adapters, lora_bias, rslora, AdaLoRA, dtypes,
what is held for backward. bitsandbytes bases: tests/test_qlora.py."""
import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn

pytest.importorskip("peft")

from peft import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.adalora import layer as adalora_layer  # noqa: E402

from lora_kernels import peft_forward  # noqa: E402
from lora_kernels.peft_patch import is_patched, patch_peft  # noqa: E402
from test_peft_patch import TOL, assert_same_grads, fused_only, lora_grads  # noqa: E402


class OwnForward(nn.Linear):
    """Stands in for a quantized base (bitsandbytes, GPTQ, torchao): a layer
    with its own forward, which only it can compute."""

    def forward(self, x):
        return super().forward(x) * 0.5 + 1.0


class WideOutput(nn.Linear):
    """A base whose output dtype is not its input's (fp32 out of bf16 in)."""

    def forward(self, x):
        return nn.functional.linear(x.float(), self.weight.float(), self.bias.float())


def hooked_linear(i, o):
    """A plain nn.Linear with a forward hook (as accelerate or a user adds):
    PEFT calls it as a module, so the hook changes the base output."""
    m = nn.Linear(i, o)
    m.register_forward_hook(lambda mod, args, out: out * 2.0)
    return m


class Net(nn.Module):
    def __init__(self, base_cls=OwnForward):
        super().__init__()
        self.lin0 = base_cls(16, 24) if isinstance(base_cls, type) else base_cls(16, 24)
        self.lin1 = nn.Linear(24, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x))).square().mean()


def pair(config, base_cls=OwnForward, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(Net(base_cls).to(dtype), config)
    for n, p in model.named_parameters():
        if "lora_B" in n or "lora_E" in n:  # B starts at zero
            nn.init.normal_(p, std=0.1)
    ref = copy.deepcopy(model)
    report = patch_peft(model, verbose=False)
    return model, ref, report


def inputs(dtype=torch.float32, shape=(2, 5, 16)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def check(model, ref, x):
    with fused_only(), mock.patch.object(peft_forward, "_unfused_branch",
                                         side_effect=AssertionError):
        loss = model(x)
        loss.backward()
    ref_loss = ref(x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(model, ref)


@pytest.mark.parametrize("base_cls", [OwnForward, hooked_linear], ids=["own-forward", "hooked"])
@pytest.mark.parametrize("extra", [
    dict(),
    dict(use_rslora=True, rank_pattern={"lin0": 3}, alpha_pattern={"lin0": 5}),
    dict(lora_bias=True),
], ids=["plain", "rslora-patterns", "lora_bias"])
def test_matches_peft(base_cls, extra):
    model, ref, report = pair(LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"],
                                         **extra), base_cls)
    assert len(report.patched) == 2 and not report.deferred
    want = {} if base_cls is hooked_linear else {"base_model.model.lin0": "OwnForward"}
    assert report.around == want
    assert ("OwnForward base layers run as their own modules" in str(report)) == bool(want)
    if extra.get("lora_bias"):
        for m in (model, ref):
            nn.init.normal_(m.base_model.model.lin0.lora_B["default"].bias)
        ref.load_state_dict(model.state_dict())
    check(model, ref, inputs())
    for x in (inputs(shape=(7, 16)), inputs(shape=(0, 16))):  # 2-D, an empty batch
        with torch.no_grad():
            torch.testing.assert_close(model.base_model.model.lin0(x),
                                       ref.base_model.model.lin0(x), **TOL)


def test_several_adapters_folded_and_with_dropout():
    model, ref, _ = pair(LoraConfig(r=4, target_modules=["lin0"]))
    for m in (model, ref):
        torch.manual_seed(3)
        m.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["lin0"],
                                          use_rslora=True, init_lora_weights=False))
        m.base_model.set_adapter(["default", "other"])
    ref.load_state_dict(model.state_dict())
    check(model, ref, inputs())
    assert lora_grads(model)["base_model.model.lin0.lora_A.other.weight"] is not None

    # Dropout on: one mask per adapter, each adapter gets its gradient.
    layer = model.base_model.model.lin0
    for a in ("default", "other"):
        layer.lora_dropout[a] = nn.Dropout(0.3)
    model.zero_grad()
    x = inputs()
    with fused_only():
        y = layer(x)
        y.square().sum().backward()
    layer.eval()
    with fused_only(), torch.no_grad():
        assert not torch.allclose(y, layer(x))
    for a in ("default", "other"):
        assert layer.lora_A[a].weight.grad.abs().sum() > 0
        assert layer.lora_B[a].weight.grad.abs().sum() > 0


def test_adalora_svd_around_own_base():
    cfg = AdaLoraConfig(r=8, init_r=6, target_r=4, total_step=10, target_modules=["lin0"])
    model, ref, report = pair(cfg)
    layer = model.base_model.model.lin0
    assert isinstance(layer, adalora_layer.SVDLinear) and is_patched(layer)
    assert report.around == {"base_model.model.lin0": "OwnForward"}
    check(model, ref, inputs())
    assert lora_grads(model)["base_model.model.lin0.lora_E.default"] is not None


def test_low_precision_x_holds_no_copy_of_x():
    """bf16 x and base, fp32 adapters (PEFT's autocast_adapter_dtype), dropout
    on: the output is bf16 and backward holds x, s and the seed, never the
    fp32 copy of x, its dropped copy or a mask that PEFT keeps."""
    model, ref, _ = pair(LoraConfig(r=4, lora_dropout=0.1, target_modules=["lin0"]),
                         dtype=torch.bfloat16)
    layers = [m.base_model.model.lin0 for m in (model, ref)]
    assert layers[0].lora_A["default"].weight.dtype == torch.float32
    x = inputs(torch.bfloat16, (64, 16)).requires_grad_()
    held = []
    for layer in layers:
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.nbytes) and t,
                lambda t: t):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        held.append(sum(saved.values()))
        assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    r, n = 4, x.numel()
    # x; s in fp32 (tokens×r); the base's W, the cast A and B in bf16; the seed
    assert held[0] <= x.nbytes + 64 * r * 4 + (24 * 16 + r * 16 + 24 * r) * 2 + 8
    assert held[1] >= 4 * n + n  # PEFT: x in fp32 (dropped) and the mask


def test_base_output_in_another_dtype_runs_peft_branch():
    """A base returning fp32 for bf16 x: the branch is PEFT's (the op takes one
    dtype), computed once, the result exactly PEFT's."""
    model, ref, _ = pair(LoraConfig(r=4, target_modules=["lin0"]), WideOutput,
                         dtype=torch.bfloat16)
    x = inputs(torch.bfloat16)
    with mock.patch.object(peft_forward, "_unfused_branch",
                           wraps=peft_forward._unfused_branch) as branch:
        y = model.base_model.model.lin0(x)
    assert branch.call_count == 1
    want = ref.base_model.model.lin0(x)
    assert y.dtype == want.dtype == torch.float32
    torch.testing.assert_close(y, want, atol=0, rtol=0)


def test_autocast_branch_in_x_dtype():
    """Under autocast the branch runs in x's dtype, as the base's output."""
    model, ref, _ = pair(LoraConfig(r=4, target_modules=["lin0"]), hooked_linear,
                         dtype=torch.bfloat16)
    x = inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_only():
        y = model.base_model.model.lin0(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref.base_model.model.lin0(x)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)


def test_merge_and_disable_run_peft():
    model, ref, _ = pair(LoraConfig(r=4, target_modules=["lin0"]))
    x = inputs()
    with torch.no_grad():
        want = ref(x)
        with fused_only():
            torch.testing.assert_close(model(x), want, **TOL)
        for m in (model, ref):  # PEFT merges into the base's weight; its forward runs
            m.merge_adapter()
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
        for m in (model, ref):
            m.unmerge_adapter()
        with fused_only():
            torch.testing.assert_close(model(x), want, **TOL)
        with model.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
