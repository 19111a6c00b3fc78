"""DoRA as a user meets it: DoraLinear, inject(use_dora=True), adapters both ways
with PEFT, patch_peft on PEFT DoRA models (Llama, GPT-2), merge_and_unload."""
import copy

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as R

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(dtype=torch.float32, layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _perturb(model, magnitude=True):
    """B ≠ 0 and m ≠ ‖W‖: every term of DoRA is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if magnitude and "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    return model


def _peft_dora(base, dropout=0.0, **kw):
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJ, use_dora=True,
                             lora_dropout=dropout, **kw)
    return _perturb(peft.get_peft_model(base, config))


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _step_both(model, patched, ids):
    """One forward + backward of PEFT's model and the patched copy:
    (loss, patched loss, PEFT's adapter gradients, the patched ones)."""
    loss = model(ids, labels=ids).loss
    loss.backward()
    loss_p = patched(ids, labels=ids).loss
    loss_p.backward()
    return loss, loss_p, _grads(model), _grads(patched)


# -- DoraLinear ----------------------------------------------------------------------------

@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dora_linear_layer_against_reference_and_merge(fifo, p):
    torch.manual_seed(0)
    layer = lk.DoraLinear(37, 29, r=4, lora_alpha=8, lora_dropout=p,
                          fan_in_fan_out=fifo).double()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(2, 5, 37, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    torch.manual_seed(4)
    y = layer(x)
    torch.manual_seed(4)
    seed = lk.functional.draw_seed("cpu") if p > 0 else 0
    want = R.dora_linear(x, w0, layer.bias, layer.lora_A, layer.lora_B,
                         layer.lora_magnitude_vector, layer.scaling, p, seed, fifo)
    torch.testing.assert_close(y, want)
    layer.eval()                                # merged in place: W ← m/‖·‖ ⊙ (W + s·B·A)
    assert layer.merged
    torch.testing.assert_close(layer(x), R.dora_linear(
        x, w0, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
        layer.scaling, 0.0, 0, fifo))
    sd = layer.state_dict()                     # checkpoints hold the unmerged W
    torch.testing.assert_close(sd["weight"], w0)
    layer.train()
    torch.testing.assert_close(layer.weight.detach(), w0)


def test_dora_linear_starts_as_the_frozen_layer_and_trains_magnitude():
    torch.manual_seed(0)
    layer = lk.DoraLinear(16, 12, r=2, lora_alpha=4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(),
                               torch.linalg.norm(layer.weight.detach(), dim=1))
    lk.mark_only_lora_as_trainable(layer)
    layer(x).square().sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.weight.grad is None
    with pytest.raises(ValueError, match=r"r: got 0, expected r > 0"):
        lk.DoraLinear(4, 4, r=0)


def test_compiled_dora_step_equals_eager(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(lk.DoraLinear(8, 6, r=2, lora_dropout=0.2),
                                lk.DoraLinear(6, 5, r=2))
    for m in model:
        torch.nn.init.normal_(m.lora_B)
    lk.mark_only_lora_as_trainable(model)
    x = torch.randn(3, 4, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    torch.manual_seed(1)
    model(x).square().sum().backward()
    eager = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(eager) == 6  # 2×(A, B, magnitude)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# -- patch_peft ----------------------------------------------------------------------------

def test_patch_peft_fuses_every_llama_dora_layer_with_peft_gradients():
    model = _peft_dora(_llama())
    patched = copy.deepcopy(model)
    report = lk.patch_peft(patched)
    assert len(report.patched) == 14 and not report.deferred
    ids = torch.randint(0, 64, (2, 9))
    for _ in range(2):   # also after an optimizer step: the norms follow A and B
        for m in (model, patched):
            m.zero_grad()
        loss, loss_p, want, got = _step_both(model, patched, ids)
        torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
        assert len(want) == 42
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
        with torch.no_grad():
            for m in (model, patched):
                for p in m.parameters():
                    if p.grad is not None:
                        p.sub_(0.5 * p.grad)
    model.eval()
    patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_patch_peft_dora_gpt2_conv1d():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(cfg)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                             use_dora=True, fan_in_fan_out=True)
    model = _perturb(peft.get_peft_model(base, config), magnitude=False)
    patched = copy.deepcopy(model)
    assert len(lk.patch_peft(patched).patched) == 2
    _, _, want, got = _step_both(model, patched, torch.randint(0, 50, (2, 7)))
    assert len(want) == 6
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_patch_peft_dora_with_dropout_trains_and_reports_what_it_leaves():
    model = _peft_dora(_llama(layers=1), dropout=0.1)
    lk.patch_peft(model)
    ids = torch.randint(0, 64, (2, 9))
    torch.manual_seed(2)
    l1 = model(ids, labels=ids).loss
    torch.manual_seed(2)
    l2 = model(ids, labels=ids).loss
    # A seeded mask: the same loss (up to the BLAS's run-to-run round-off).
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    l1.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # Two active DoRA adapters: PEFT's own forward, per call.
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "second"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    model.eval()
    x = torch.randn(3, 32)
    torch.testing.assert_close(q(x), type(q).forward(q, x))


# -- inject(use_dora=True), adapters, merge_and_unload ------------------------------------------

def test_inject_dora_adapters_round_trip_with_peft(tmp_path):
    base = _llama(torch.float64, layers=1)
    ours = copy.deepcopy(base)
    _, summary = lk.inject(ours, PROJ, r=4, lora_alpha=8, use_dora=True)
    assert "DoraLinear(32, 32)" in str(summary)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    ids = torch.randint(0, 64, (2, 7))
    want = ours(ids).logits
    config = lk.save_adapter(ours, str(tmp_path / "ours"))
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(ids).logits, want)
    theirs.save_pretrained(str(tmp_path / "peft"))
    again = copy.deepcopy(base)
    lk.load_adapter(again, str(tmp_path / "peft"))
    assert isinstance(again.model.layers[0].mlp.up_proj, lk.DoraLinear)
    torch.testing.assert_close(again(ids).logits, want)
    # A plain LoRA model refuses a DoRA adapter, changing nothing.
    plain = copy.deepcopy(base)
    lk.inject(plain, PROJ, r=4, lora_alpha=8)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=r"use_dora=True; expected use_dora=False"):
        lk.load_adapter(plain, str(tmp_path / "peft"))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


def test_inject_dora_refuses_other_layer_types():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"use_dora: got True, expected False for targets"):
        lk.inject(model, ["0", "1"], use_dora=True)
    assert type(model[1]) is torch.nn.Linear


def test_merge_and_unload_gives_peft_merged_logits(tmp_path):
    base = _llama(torch.float64, layers=1)
    model = _peft_dora(copy.deepcopy(base))
    model.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 64, (2, 7))
    want = model.merge_and_unload()(ids).logits
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, str(tmp_path))
    weight = ours.model.layers[0].self_attn.q_proj.weight
    merged = lk.merge_and_unload(ours)
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.weight.data_ptr() == weight.data_ptr()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, want)


def test_reset_lora_parameters_restarts_dora_magnitudes():
    """After meta-device construction and loading W, fresh DoRA adapters start
    as PEFT's do: m = ‖W‖ per row, the model computes the base model."""
    base = _llama(layers=1)
    ids = torch.randint(0, 64, (2, 7))
    want = base(ids).logits
    model = _peft_dora(copy.deepcopy(base))
    ours = copy.deepcopy(base)
    lk.inject(ours, PROJ, r=4, use_dora=True)
    for m in (model, ours):
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.normal_()
        assert lk.reset_lora_parameters(m) == 7
        torch.testing.assert_close(m(ids).logits, want)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.lora_magnitude_vector["default"].weight,
                               torch.linalg.norm(q.base_layer.weight, dim=1))


def test_patch_peft_dora_bf16_model_with_fp32_adapters():
    """A bf16 model with PEFT's fp32 adapters: the branch runs in bf16 (the
    adapters cast, never x); gradients match PEFT's to bf16 precision."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2)
    model = _perturb(peft.get_peft_model(
        transformers.LlamaForCausalLM(cfg).to(torch.bfloat16),
        peft.LoraConfig(r=8, lora_alpha=16, use_dora=True,
                        target_modules=["q_proj", "v_proj", "down_proj"])), magnitude=False)
    patched = copy.deepcopy(model)
    assert len(lk.patch_peft(patched).patched) == 3
    loss, loss_p, want, got = _step_both(model, patched, torch.randint(0, 64, (2, 9)))
    torch.testing.assert_close(loss_p, loss, rtol=1e-2, atol=1e-2)
    for name in want:
        assert got[name].dtype == torch.float32
        assert (got[name] - want[name]).norm() <= 3e-2 * want[name].norm(), name


def test_dora_linear_merge_is_seen_by_the_row_norm_cache():
    """eval() merges into W in place, train() takes it out: the cached ‖W_i‖²
    follows W's version counter, so the next forward uses W's own norms."""
    torch.manual_seed(0)
    layer = lk.DoraLinear(12, 10, r=2, lora_alpha=4).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 12, dtype=torch.float64)
    y = layer(x)
    version = layer.weight._version
    layer.eval()
    layer.train()
    assert layer.weight._version > version
    with torch.no_grad():
        layer.weight.mul_(1.5)
    torch.testing.assert_close(layer(x), R.dora_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
        layer.scaling))
    assert not torch.allclose(layer(x), y)
