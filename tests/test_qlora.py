"""QLoRA: bitsandbytes 4-bit NF4 and 8-bit bases on the CPU.

patch_peft on PEFT's bnb LoRA layers against unpatched PEFT (loss, every LoRA
gradient, training), inject on a quantized model (WrappedLinear: no dequantized
copy, no merge), adapters both ways between the two. Skipped where
bitsandbytes cannot run its 4-bit layers.

Note: on CPUs with AVX512-BF16, a bitsandbytes 4-bit layer run in eval mode
under no_grad repacks its weight for inference, and later backward passes
through it lose their input gradient; these tests compare in train mode."""
import contextlib
import copy
from unittest import mock

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.adalora import bnb as adalora_bnb  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import peft_forward  # noqa: E402
from lora_kernels.wrapped import WrappedLinear  # noqa: E402
from bnb_support import bnb_reason  # noqa: E402
from test_peft_patch import PEFT_FORWARDS, TOL, assert_same_grads, lora_grads  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


_REASON = bnb_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved to disk (sizes are multiples of 64, as
    bitsandbytes' CPU kernels want)."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(path, bits=4, compute=torch.float32, dtype=torch.float32):
    if bits == 4:
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=compute)
    else:
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                              quantization_config=q)
    return model.train()  # see the module docstring


def peft_pair(path, config, **kw):
    """(patched, unpatched) PEFT models on the same quantized base, with
    nonzero B (and E) so every gradient is exercised."""
    torch.manual_seed(0)
    model = get_peft_model(load(path, **kw), config)
    for n, p in model.named_parameters():
        if "lora_B" in n or "lora_E" in n:
            torch.nn.init.normal_(p, std=0.05)
    ref = copy.deepcopy(model)
    report = lora_kernels.patch_peft(model, verbose=False)
    return model, ref, report


def tokens(n=2, t=12, seed=2):
    ids = torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids)


@contextlib.contextmanager
def fused_only():
    """Fail if a layer runs PEFT's forward or PEFT's branch."""
    def boom(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} ran PEFT's forward")
    forwards = PEFT_FORWARDS + [(c, "forward") for c in (
        lora_bnb.Linear4bit, lora_bnb.Linear8bitLt, adalora_bnb.SVDLinear4bit,
        adalora_bnb.SVDLinear8bitLt)]
    with contextlib.ExitStack() as stack:
        for cls, name in forwards:
            stack.enter_context(mock.patch.object(cls, name, boom))
        stack.enter_context(mock.patch.object(peft_forward, "_unfused_branch",
                                              side_effect=AssertionError("PEFT's branch ran")))
        yield


def check_parity(model, ref, batch):
    """The patched model runs fused only; its loss and every LoRA gradient are PEFT's."""
    with fused_only():
        loss = model(**batch).loss
        loss.backward()
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(model, ref)


def test_patch_peft_fuses_every_4bit_layer_and_matches_peft(llama_dir):
    """The issue's model: NF4 base, r=8 on 7 projections, fp32 compute,
    dropout 0: all 14 layers fused around Linear4bit; loss, every LoRA
    gradient and three training steps equal PEFT's."""
    model, ref, report = peft_pair(llama_dir, LoraConfig(r=8, lora_alpha=16,
                                                         target_modules=TARGETS))
    assert len(report.patched) == 14 and not report.deferred
    assert set(report.around.values()) == {"Linear4bit"}
    assert "14 Linear4bit base layers run as their own modules" in str(report)
    check_parity(model, ref, tokens())
    assert all(g.abs().sum() > 0 for g in lora_grads(model).values())

    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (model, ref)]
    for step in range(3):
        losses = []
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            loss = m(**tokens(seed=10 + step)).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], **TOL)


@pytest.mark.parametrize("bits,config", [
    (8, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])),
    (4, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"], lora_bias=True,
                   use_rslora=True)),
    (4, AdaLoraConfig(r=8, init_r=6, target_r=4, total_step=10,
                      target_modules=["q_proj", "down_proj"])),
], ids=["8bit", "4bit-lora_bias-rslora", "4bit-adalora"])
def test_other_quantized_layers_match_peft(llama_dir, bits, config):
    model, ref, report = peft_pair(llama_dir, config, bits=bits)
    assert len(report.around) == 4 and not report.deferred
    check_parity(model, ref, tokens())


def test_bf16_with_dropout_runs_fused_and_holds_no_copy_of_x(llama_dir):
    """bf16 model and compute, fp32 adapters, dropout 0.05: every layer runs
    fused, the loss is close to PEFT's, and backward holds less (PEFT keeps
    an fp32 dropped copy of x and a mask per layer)."""
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
    model, ref, _ = peft_pair(llama_dir, config, compute=torch.bfloat16, dtype=torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    batch = tokens()
    held = []
    for m in (model, ref):
        saved = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter) and t._base is None:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if m is model:
                with fused_only():
                    loss = m(**batch).loss
            else:
                loss = m(**batch).loss
        loss.backward()
        held.append(sum(saved.values()))
        assert abs(loss.item() - 4.16) < 0.5  # ln(64): random weights
    assert held[0] < held[1]
    grads = lora_grads(model)
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())


def test_patched_qlora_adapter_round_trip(llama_dir, tmp_path):
    model, _, _ = peft_pair(llama_dir, LoraConfig(r=4, target_modules=TARGETS))
    batch = tokens()
    want = model(**batch).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(llama_dir), tmp_path, is_trainable=True)
    assert len(lora_kernels.patch_peft(loaded, verbose=False).around) == 14
    with fused_only():
        torch.testing.assert_close(loaded(**batch).logits.detach(), want, **TOL)


# ---------------------------------------------------------------------------
# inject on a quantized model
# ---------------------------------------------------------------------------

def test_inject_wraps_4bit_layers_without_a_dense_copy(llama_dir):
    model = load(llama_dir)
    batch = tokens()
    before = model(**batch).logits.detach()
    quant = {n: p for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    float_bytes = sum(p.nbytes for p in model.parameters() if p.is_floating_point())
    _, summary = lora_kernels.inject(model, target_modules="all-linear", r=4, lora_alpha=8)
    wrapped = [m for m in model.modules() if isinstance(m, WrappedLinear)]
    assert len(wrapped) == 14 and "WrappedLinear(Linear4bit(64, 128))" in str(summary)
    # The same quantized Parameters, no dense W anywhere: only A and B are new.
    after = dict(model.named_parameters())
    for n, p in quant.items():
        owner, _, leaf = n.rpartition(".")
        assert after[f"{owner}.base_layer.{leaf}"] is p
    lora_bytes = sum(m.lora_A.nbytes + m.lora_B.nbytes for m in wrapped)
    assert sum(p.nbytes for p in model.parameters() if p.is_floating_point()) \
        == float_bytes + lora_bytes
    assert all(m.lora_A.dtype == torch.float32 for m in wrapped)
    assert summary.all_params > sum(p.numel() for p in model.parameters())  # 4-bit counted x2
    # B starts at zero: the outputs are the quantized model's.
    torch.testing.assert_close(model(**batch).logits.detach(), before, atol=0, rtol=0)
    loss = model(**batch).loss
    loss.backward()
    assert all(m.lora_A.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in wrapped)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in after if ".lora_" in n}


def test_inject_refuses_merging_into_a_quantized_base(llama_dir):
    model = load(llama_dir)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"merge_weights: got True, expected None or False: "
                                         r"'model.layers.0.self_attn.q_proj' is a Linear4bit"):
        lora_kernels.inject(model, target_modules=["q_proj"], merge_weights=True)
    assert [n for n, _ in model.named_parameters()] == names  # nothing replaced
    lin = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"merge_weights: got True, expected False for a "
                                         r"Linear4bit base"):
        WrappedLinear(lin, r=4, merge_weights=True)
    with pytest.raises(ValueError, match=r"base_layer: got a LayerNorm without positive"):
        WrappedLinear(torch.nn.LayerNorm(4), r=2)

    # eval() leaves W alone (the branch runs unmerged).
    lora_kernels.inject(model, target_modules=["q_proj"], r=4)
    layer = model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B)
    w = layer.base_layer.weight.detach().clone()
    model.eval()
    assert not layer.merged and torch.equal(layer.base_layer.weight, w)
    with pytest.raises(ValueError, match=r"merging ΔW into a Linear4bit base is refused"):
        layer._apply_delta(+1)


def test_inject_8bit_trains(llama_dir):
    model = load(llama_dir, bits=8)
    lora_kernels.inject(model, target_modules=["q_proj", "down_proj"], r=4, lora_dropout=0.1)
    wrapped = [m for m in model.modules() if isinstance(m, WrappedLinear)]
    assert len(wrapped) == 4 and type(wrapped[0].base_layer).__name__ == "Linear8bitLt"
    model(**tokens()).loss.backward()
    assert all(m.lora_B.grad.abs().sum() > 0 for m in wrapped)


def test_adapters_between_inject_and_peft_on_4bit(llama_dir, tmp_path):
    """save_adapter from an injected 4-bit model loads into PEFT's QLoRA
    model, and PEFT's adapter loads back with load_adapter (which injects)."""
    model = load(llama_dir)
    lora_kernels.inject(model, target_modules=TARGETS, r=4, lora_alpha=8)
    for m in model.modules():
        if isinstance(m, WrappedLinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    batch = tokens()
    want = model(**batch).logits.detach()
    lora_kernels.save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(load(llama_dir), tmp_path / "ours")
    peft_model.train()
    torch.testing.assert_close(peft_model(**batch).logits.detach(), want, **TOL)

    peft_model.save_pretrained(tmp_path / "peft")
    fresh = load(llama_dir)
    lora_kernels.load_adapter(fresh, tmp_path / "peft")
    assert sum(isinstance(m, WrappedLinear) for m in fresh.modules()) == 14
    fresh.train()
    torch.testing.assert_close(fresh(**batch).logits.detach(), want, **TOL)
