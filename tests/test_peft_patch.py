"""patch_peft / unpatch_peft against unpatched PEFT on tiny models: outputs, every
LoRA gradient, training, merge, disable, save/load, several adapters, AdaLoRA's
rank allocation, what is left to PEFT and why."""
import contextlib
import copy
import io
from unittest import mock

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.adalora import layer as adalora_layer  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402

from lora_kernels.peft_patch import is_patched, patch_peft, unpatch_peft  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)
PEFT_FORWARDS = [(lora_layer.Linear, "forward"), (lora_layer.Embedding, "forward"),
                 (lora_layer._ConvNd, "forward"), (adalora_layer.SVDLinear, "forward")]


@contextlib.contextmanager
def fused_only():
    """Fail if any layer falls back to PEFT's own forward."""
    def boom(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} ran PEFT's forward")
    with contextlib.ExitStack() as stack:
        for cls, name in PEFT_FORWARDS:
            stack.enter_context(mock.patch.object(cls, name, boom))
        yield


class Net(nn.Module):
    """Embedding, Linear with and without bias, Conv1d and Conv2d."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16, padding_idx=0)
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8, bias=False)
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 5, 3, stride=2, padding=1)

    def forward(self, idx, img):
        h = self.lin1(torch.relu(self.lin0(self.emb(idx))))
        c1 = self.conv1(img.flatten(2)[..., :10])
        c2 = self.conv2(img)
        return h.square().mean() + c1.square().mean() + c2.square().mean()


def net_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (3, 7), generator=g), torch.randn(2, 3, 6, 6, generator=g)


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def tokens(n=2, t=9):
    ids = torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(2))
    return dict(input_ids=ids, labels=ids)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pair(base_fn, config, seed=0):
    """(patched, unpatched) PEFT models with the same weights."""
    torch.manual_seed(seed)
    model = get_peft_model(base_fn(), config)
    ref = copy.deepcopy(model)
    patch_peft(model, verbose=False)
    return model, ref


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(a, b):
    ga, gb = lora_grads(a), lora_grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert ga[n] is not None and gb[n] is not None, n
        torch.testing.assert_close(ga[n], gb[n], **TOL, msg=n)


def loss_of(model, inputs):
    return model(**inputs).loss if isinstance(inputs, dict) else model(*inputs)


def check_parity(model, ref, inputs):
    with fused_only():
        loss = loss_of(model, inputs)
        loss.backward()
    ref_loss = loss_of(ref, inputs)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(model, ref)


# ---------------------------------------------------------------------------
# Parity with unpatched PEFT
# ---------------------------------------------------------------------------

NET_TARGETS = ["emb", "lin0", "lin1", "conv1", "conv2"]


@pytest.mark.parametrize("extra", [
    dict(),
    dict(use_rslora=True, rank_pattern={"lin1": 2, "conv2": 3}, alpha_pattern={"lin0": 5}),
    dict(lora_bias=True, target_modules=["lin0", "lin1", "conv1", "conv2"]),
], ids=["plain", "rslora-patterns", "lora_bias"])
def test_every_layer_kind_matches_peft(extra):
    kw = dict(r=4, lora_alpha=8, target_modules=NET_TARGETS, init_lora_weights=False)
    kw.update(extra)
    model, ref = pair(Net, LoraConfig(**kw))
    if extra.get("lora_bias"):
        for m in model.modules():  # PEFT starts lora_B's bias at zero
            if isinstance(m, lora_layer.LoraLayer):
                nn.init.normal_(m.lora_B["default"].bias)
        ref.load_state_dict(model.state_dict())
    report = patch_peft(model, verbose=False)
    assert len(report.patched) == len(kw["target_modules"]) and not report.deferred
    check_parity(model, ref, net_inputs())


def test_llama_logits_grads_and_training_match_peft():
    model, ref = pair(tiny_llama, LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                             init_lora_weights=False))
    batch = tokens()
    with fused_only():
        logits = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(logits, ref(input_ids=batch["input_ids"]).logits, **TOL)
    check_parity(model, ref, batch)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for m in (model, ref):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for _ in range(3):
            opt.zero_grad()
            loss = m(**batch).loss
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for n, p in model.named_parameters():  # only adapter parameters moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert "lora_" in n and not torch.equal(p, start[n]), n


def test_gpt2_conv1d_fan_in_fan_out():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                     fan_in_fan_out=True, init_lora_weights=False)
    model, ref = pair(tiny_gpt2, cfg)
    assert isinstance(model.base_model.model.transformer.h[0].attn.c_attn.base_layer,
                      transformers.pytorch_utils.Conv1D)
    check_parity(model, ref, tokens())


def test_adapter_dtype_differs_from_base():
    """bf16 model, fp32 adapters (PEFT's autocast_adapter_dtype): output in bf16,
    adapter grads in fp32, no fp32 copy of x held for backward."""
    def bf16_llama():
        return tiny_llama().to(torch.bfloat16)
    model, ref = pair(bf16_llama, LoraConfig(r=4, target_modules=LLAMA_TARGETS,
                                             init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    held = []
    for m in (layer, ref.base_model.model.model.layers[0].self_attn.q_proj):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        held.append(sum(sizes))
    assert held[0] < held[1]
    ga, gb = lora_grads(model), lora_grads(ref)
    for n in ga:
        if ga[n] is not None:
            assert ga[n].dtype == torch.float32
            torch.testing.assert_close(ga[n], gb[n], atol=2e-2, rtol=5e-2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens()["input_ids"]).logits,
                                   ref(input_ids=tokens()["input_ids"]).logits,
                                   atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------
# PEFT features keep working
# ---------------------------------------------------------------------------

def test_merge_unmerge_merge_and_unload_and_disable():
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    plain = copy.deepcopy(base)
    cfg = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg).eval()
    patch_peft(model, verbose=False)
    ids = tokens()["input_ids"]
    with torch.no_grad(), fused_only():
        out = model(input_ids=ids).logits
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits,
                                       plain(input_ids=ids).logits)
        assert not torch.allclose(out, plain(input_ids=ids).logits)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, out, **TOL)
        model.unmerge_adapter()
        with fused_only():
            torch.testing.assert_close(model(input_ids=ids).logits, out, **TOL)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, out, **TOL)
    assert unpatch_peft(merged) == 0


def test_save_load_round_trip_with_dropout(tmp_path):
    cfg = LoraConfig(r=4, lora_dropout=0.2, target_modules=["lin0", "lin1", "emb", "conv2"])
    model, _ = pair(Net, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(*net_inputs()).backward()  # dropout on: the fused masks
        opt.step()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Net(), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        with fused_only():
            want = model(*net_inputs())
        torch.testing.assert_close(loaded(*net_inputs()), want, **TOL)
        patch_peft(loaded, verbose=False)
        with fused_only():
            torch.testing.assert_close(loaded(*net_inputs()), want, **TOL)


def test_several_active_adapters():
    cfg = LoraConfig(r=4, target_modules=["lin0", "lin1", "emb", "conv2"],
                     init_lora_weights=False)
    model, ref = pair(Net, cfg)
    other = LoraConfig(r=2, lora_alpha=6, target_modules=["lin0", "emb", "conv2"],
                       init_lora_weights=False, use_rslora=True)
    for m in (model, ref):
        torch.manual_seed(3)
        m.add_adapter("other", other)
        m.base_model.set_adapter(["default", "other"])
    ref.load_state_dict(model.state_dict())
    check_parity(model, ref, net_inputs())
    assert any(".other" in n for n, g in lora_grads(model).items() if g is not None)

    for m in (model, ref):  # switching adapters (lin1 has none active: its base runs)
        m.set_adapter("other")
    with torch.no_grad():
        got = model(*net_inputs())
    torch.testing.assert_close(got, ref(*net_inputs()), **TOL)

    # Mixed batches (adapter_names=) are PEFT's.
    x = torch.randn(3, 16)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        got = model.base_model.model.lin0(x, adapter_names=names)
        want = ref.base_model.model.lin0(x, adapter_names=names)
        assert not torch.allclose(got[0], got[1])
    torch.testing.assert_close(got, want, **TOL)


def test_several_adapters_with_dropout_train():
    cfg = LoraConfig(r=4, lora_dropout=0.3, target_modules=["lin0"], init_lora_weights=False)
    model, _ = pair(Net, cfg)
    model.add_adapter("other", cfg)
    model.base_model.set_adapter(["default", "other"])
    patch_peft(model, verbose=False)
    layer = model.base_model.model.lin0
    x = torch.randn(6, 16)
    with fused_only():
        y_train = layer(x)
        y_train.square().sum().backward()
    layer.eval()
    with fused_only():
        y_eval = layer(x)
    assert not torch.allclose(y_train, y_eval)
    for a in ("default", "other"):
        assert layer.lora_A[a].weight.grad is not None and layer.lora_B[a].weight.grad is not None


def test_patch_twice_is_noop_and_unpatch_restores_peft_forward():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=NET_TARGETS,
                                             init_lora_weights=False))
    ref = copy.deepcopy(model)
    first = patch_peft(model, verbose=False)
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    layers = [m for m in model.modules() if isinstance(m, lora_layer.LoraLayer)]
    fwds = [m.__dict__["forward"] for m in layers]
    second = patch_peft(model, verbose=False)
    assert second.as_dict() == first.as_dict()
    assert [m.__dict__["forward"] for m in layers] == fwds
    assert unpatch_peft(model) == len(layers)
    for m in layers:
        assert "forward" not in m.__dict__ and not is_patched(m)
        assert m.forward == type(m).forward.__get__(m)  # PEFT's bound method
    assert unpatch_peft(model) == 0
    torch.testing.assert_close(model(*net_inputs()), ref(*net_inputs()), atol=0, rtol=0)


def test_patched_model_deepcopies_and_pickles():
    model, ref = pair(Net, LoraConfig(r=4, target_modules=NET_TARGETS, init_lora_weights=False))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        want = ref(*net_inputs())
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        layer = clone.base_model.model.lin0
        assert is_patched(layer) and layer.forward.__self__ is layer
        with torch.no_grad(), fused_only():
            torch.testing.assert_close(clone(*net_inputs()), want, **TOL)


# ---------------------------------------------------------------------------
# AdaLoRA
# ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # rank-0 layers
def test_adalora_matches_peft_with_rank_allocation(tmp_path):
    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6,
                        orth_reg_weight=0.1, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    model, ref = pair(tiny_llama, cfg)
    assert all(is_patched(m) for m in model.modules()
               if isinstance(m, adalora_layer.SVDLinear))
    batch = tokens()
    check_parity(model, ref, batch)
    runs = []
    for m in (model, ref):
        m.zero_grad()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
        losses = []
        for step in range(6):
            loss = m(**batch).loss  # includes the orthogonal regularisation
            loss.backward()
            opt.step()
            m.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and pattern == ref.peft_config["default"].rank_pattern
    assert sum(map(sum, pattern.values())) < 6 * len(pattern)  # ranks were cut

    model.save_pretrained(tmp_path)
    model.eval()
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, **TOL)
        patch_peft(loaded, verbose=False)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, **TOL)
    # Loading resizes each layer to its allocated rank; rank-0 layers run PEFT's
    # forward (nothing to fuse), the others the fused one.
    svd = [m for m in loaded.modules() if isinstance(m, adalora_layer.SVDLinear)]
    assert all(is_patched(m) for m in svd)
    ranks = [m.lora_A["default"].shape[0] for m in svd]
    assert sorted(ranks) == sorted(sum(v) for v in pattern.values())
    x = torch.randn(3, 32)
    for m in svd:
        if m.lora_A["default"].shape[0] and m.in_features == 32:
            with torch.no_grad(), fused_only():
                m(x)


# ---------------------------------------------------------------------------
# What is left to PEFT, and bad input
# ---------------------------------------------------------------------------

class QuantEmbedding(nn.Embedding):
    """Stands in for a quantized embedding: nn.Embedding with its own forward."""

    def forward(self, x):
        return super().forward(x)


def test_deferral_summary(capsys):
    torch.manual_seed(0)
    net = Net()
    net.emb = QuantEmbedding(20, 16)
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["lin0", "emb"],
                                           init_lora_weights=False))
    model.add_adapter("dora", LoraConfig(r=4, target_modules=["conv2"], use_dora=True))
    ref = copy.deepcopy(model)
    report = patch_peft(model)
    out = capsys.readouterr().out
    assert "1 of 3 LoRA layers fused" in out and "2 left to PEFT" in out
    assert report.patched == ["base_model.model.lin0"]
    assert "DoRA" in report.deferred["base_model.model.conv2"]
    assert "QuantEmbedding" in report.deferred["base_model.model.emb"]
    assert report.as_dict()["patched"] == 1

    # A patched layer with a DoRA adapter added later runs PEFT's forward
    # whenever that adapter is active.
    for m in (model, ref):
        torch.manual_seed(4)
        m.add_adapter("dora2", LoraConfig(r=2, target_modules=["lin0"], use_dora=True,
                                          init_lora_weights=False))
        m.base_model.set_adapter(["default", "dora2"])
    ref.load_state_dict(model.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(model.base_model.model.lin0(x), ref.base_model.model.lin0(x),
                               **TOL)


def test_bad_input():
    with pytest.raises(ValueError, match=r"model: got a Linear with no PEFT LoRA layers"):
        patch_peft(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"model: got str, expected a PEFT model"):
        patch_peft("model")
    with pytest.raises(ValueError, match=r"model: got int"):
        unpatch_peft(3)
    assert unpatch_peft(nn.Linear(2, 2)) == 0  # nothing patched: a no-op
