"""inject() into plain and transformers models, and adapters in PEFT's format, both ways."""
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.adapters import AdapterError, load_adapter, save_adapter
from lora_kernels.inject import inject

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # transformers/PEFT deprecation and config notes
        yield


def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": (llama, LLAMA_TARGETS), "gpt2": (gpt2, GPT2_TARGETS)}
TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        return self.head(self.fc2(torch.relu(self.fc1(self.emb(idx)))))


class ConvNet(nn.Module):
    """Embedding, Conv1d, Conv2d (kernel ks2), Conv3d (kernel ks3), 1×1 Conv2d, head."""

    def __init__(self, ks2=(3, 3), ks3=(3, 3, 3)):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.c1 = nn.Conv1d(4, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 6, ks2, padding=1)
        self.c3 = nn.Conv3d(6, 3, ks3, padding=1)
        self.pw = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        h = self.c1(self.emb(idx).transpose(1, 2))
        h = self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous())
        h = self.c3(h.unsqueeze(-1).expand(-1, -1, -1, -1, 3).contiguous()).mean(-1)
        return self.head(self.pw(h).mean((2, 3)))


CONV_TARGETS = ["emb", "c1", "c2", "c3", "pw"]


def conv_net(**kw):
    torch.manual_seed(0)
    return ConvNet(**kw).double().eval()


def randomise_lora(model, scale=0.1, biases=False):
    """Give every LoRA tensor (and trainable bias) a random value, so ΔW is not zero."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (biases and name.endswith("bias") and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def snapshot(model):
    return {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_unchanged(model, snap, types):
    assert [type(m) for m in model.modules()] == types
    now = dict(model.named_parameters())
    assert now.keys() == snap.keys()
    for n, (p, value, grad) in snap.items():
        assert now[n] is p and p.requires_grad == grad and torch.equal(p, value), n


# -- inject ----------------------------------------------------------------------------------

def check_inject(model, targets, kinds, x, forward, **kw):
    before = {n: p for n, p in model.named_parameters()}
    ref = forward(model, x)
    _, summary = inject(model, targets, r=4, lora_alpha=8, **kw)
    lora = {n: m for n, m in model.named_modules() if isinstance(m, lk.LoRALayer)}
    assert sorted(lora) == sorted(summary.layers) and lora
    assert {type(m) for m in lora.values()} == kinds
    after = dict(model.named_parameters())
    for n, p in before.items():      # the same Parameter objects (conv moves W to .conv)
        m_name, _, attr = n.rpartition(".")
        mod = model.get_submodule(m_name)
        own = getattr(mod.conv if isinstance(mod, lk.ConvLoRA) else mod, attr)
        assert own is p, n
    for n, p in after.items():
        assert p.requires_grad == ("lora_" in n), n
    assert summary.trainable_params == sum(p.numel() for n, p in after.items() if "lora_" in n)
    torch.testing.assert_close(forward(model, x), ref)    # B = 0: outputs unchanged
    for m in lora.values():
        if isinstance(m, lk.Embedding):
            assert not m.lora_A.any() and m.lora_B.std() > 0.5
        else:
            assert not m.lora_B.any() and m.lora_A.abs().max() > 0
    return lora


def check_training_changes_only_lora(model, x, forward):
    model.train()
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        forward(model, x).float().pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, snap[n])
        assert changed == ("lora_" in n), n
        if "lora_" not in n:
            assert p.grad is None, n


def test_inject_mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randint(0, 11, (4, 5))
    check_inject(model, ["emb", "fc1", "fc2"], {lk.Embedding, lk.Linear}, x, lambda m, x: m(x))
    assert model.fc2.bias is None and model.fc1.fan_in_fan_out is False
    assert not model.head.weight.requires_grad
    check_training_changes_only_lora(model, x, lambda m, x: m(x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inject_transformers(arch):
    make, targets = MODELS[arch]
    model = make()
    lora = check_inject(model, targets, {lk.Linear}, TOKENS, lambda m, x: m(x).logits)
    assert len(lora) == (14 if arch == "llama" else 8)
    assert all(m.fan_in_fan_out == (arch == "gpt2") for m in lora.values())
    if arch == "gpt2":      # Conv1D keeps W as (in, out)
        attn = model.transformer.h[0].attn.c_attn
        assert attn.weight.shape == (32, 96) and attn.lora_A.shape == (4, 32)
        assert attn.lora_B.shape == (96, 4)
    check_training_changes_only_lora(model, TOKENS, lambda m, x: m(x).logits)


def test_inject_patterns_regex_bias_and_modules_to_save():
    model = llama()
    _, s = inject(model, r"model\.layers\.1\.self_attn\.(q|v)_proj", r=4, lora_alpha=8,
                  rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    q, v = model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.v_proj
    assert list(s.layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert (q.r, q.lora_alpha, q.scaling, v.r, v.scaling) == (4, 3, 0.75, 2, 4.0)

    model = gpt2()
    _, s = inject(model, GPT2_TARGETS, exclude_modules=["mlp.c_proj"], bias="lora_only",
                  modules_to_save=["lm_head"])
    assert "transformer.h.0.mlp.c_proj" not in s.layers and len(s.layers) == 6
    assert model.transformer.h[0].attn.c_attn.bias.requires_grad
    assert not model.transformer.h[0].ln_1.bias.requires_grad
    assert model.lm_head.weight.requires_grad        # tied to wte: both stay the same tensor
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head: trainable" in str(s)

    model = llama()
    _, s = inject(model, "all-linear")
    assert len(s.layers) == 14 and isinstance(model.lm_head, nn.Linear)


def test_inject_shared_module_replaced_everywhere():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.add_module("again", model[0])
    w = model[0].weight
    inject(model, ["0", "again"], r=2)
    assert model[0] is model.again and model[0].weight is w


BAD_INJECT = [
    (dict(target_modules=["nope"]), r"target_modules: got \['nope'\].*'fc1'"),
    (dict(target_modules=r"fc\d+x"), "target_modules"),
    (dict(target_modules=["fc1", "emb"], r=0), "r: got 0"),
    (dict(target_modules=["fc1"], r=2.0), "r: got 2.0"),
    (dict(target_modules=["fc1"], lora_alpha="8"), "lora_alpha"),
    (dict(target_modules=["fc1"], lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=["fc1"], bias="some"), "bias"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="fc[1"), "regular expression"),
    (dict(target_modules=["fc1"], rank_pattern={"fc1": -1}), r"rank_pattern\['fc1'\]"),
    (dict(target_modules=["fc1"], modules_to_save=["nothing"]), "modules_to_save"),
    (dict(target_modules=["fc1"], modules_to_save=["fc1"]), "modules_to_save"),
    (dict(target_modules=["block"]), "unsupported|supported types.*'block' \\(Sequential\\)"),
    (dict(target_modules=["act"]), "supported types"),
]


@pytest.mark.parametrize("kwargs,match", BAD_INJECT)
def test_inject_errors_change_nothing(kwargs, match):
    model = MLP()
    model.block = nn.Sequential(nn.Linear(2, 2))
    model.act = nn.ReLU()
    snap, types = snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        inject(model, **kwargs)
    assert_unchanged(model, snap, types)


def test_inject_refuses_lora_layers_and_failure_midway_restores():
    model = MLP()
    inject(model, ["fc1"], r=2)
    with pytest.raises(ValueError, match="already"):
        inject(model, ["fc1"], r=2)
    # a layer that fails to build after others were replaced: everything is put back
    model = MLP()
    model.fc2.weight = nn.Parameter(torch.zeros(16, 16))     # does not fit the layer
    snap, types = snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match="fc2"):
        inject(model, ["fc1", "fc2", "emb"], r=2)
    assert_unchanged(model, snap, types)


# -- adapters with PEFT ----------------------------------------------------------------------

def peft_config_dict(directory):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig.from_pretrained(str(directory)).to_dict()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ours_to_peft(arch, tmp_path):
    peft = pytest.importorskip("peft")
    make, targets = MODELS[arch]
    model = make()
    inject(model, targets, r=4, lora_alpha=8, lora_dropout=0.05,
           rank_pattern={"v_proj": 2, "c_fc": 2}, alpha_pattern={"o_proj": 3, "c_proj": 5})
    randomise_lora(model)
    model.eval()
    ours = model(TOKENS).logits
    cfg = save_adapter(model, tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == cfg
    theirs = peft_config_dict(tmp_path)
    assert set(theirs) == set(cfg)       # every key of LoraConfig.to_dict(), nothing else
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out",
                "rank_pattern", "alpha_pattern", "use_rslora", "task_type"):
        assert theirs[key] == cfg[key] or str(theirs[key]) == "LORA", key
    assert cfg["fan_in_fan_out"] == (arch == "gpt2") and cfg["lora_dropout"] == 0.05
    assert sorted(cfg["target_modules"]) == sorted(targets)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(pm(TOKENS).logits, ours, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    from peft.utils import get_peft_model_state_dict
    assert keys.keys() == get_peft_model_state_dict(pm).keys()


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("gpt2", True)])
def test_peft_to_ours(arch, rslora, tmp_path):
    peft = pytest.importorskip("peft")
    make, targets = MODELS[arch]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora,
                          rank_pattern={"k_proj": 2, "c_fc": 2}, alpha_pattern={"up_proj": 3},
                          bias="lora_only")
    pm = peft.get_peft_model(make(), cfg)
    randomise_lora(pm, biases=True)
    pm.eval()
    ref = pm(TOKENS).logits
    pm.save_pretrained(str(tmp_path))

    model = make()           # no LoRA layers: load_adapter injects them from the config
    res = load_adapter(model, tmp_path)
    assert res.injected is not None and len(res.layers) == (14 if arch == "llama" else 8)
    torch.testing.assert_close(model(TOKENS).logits, ref, rtol=1e-5, atol=1e-5)

    model = make()           # injected by hand, other alpha, in eval mode and merged
    inject(model, targets, r=4, lora_alpha=16, rank_pattern={"k_proj": 2, "c_fc": 2})
    model.eval()
    load_adapter(model, tmp_path)
    torch.testing.assert_close(model(TOKENS).logits, ref, rtol=1e-5, atol=1e-5)
    model.train()
    model.eval()             # unmerge and merge again with the loaded scaling
    torch.testing.assert_close(model(TOKENS).logits, ref, rtol=1e-5, atol=1e-5)
    layer = next(m for m in model.modules() if isinstance(m, lk.Linear) and m.r == 4)
    assert layer.scaling == pytest.approx(8 / math.sqrt(4) if rslora else 8 / 4)

    # and back out to PEFT again: same outputs
    save_adapter(model, tmp_path / "again")
    pm2 = peft.PeftModel.from_pretrained(make(), str(tmp_path / "again")).eval()
    torch.testing.assert_close(pm2(TOKENS).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", [dict(), dict(ks2=(3, 1), ks3=(1, 1, 1)),
                                     dict(ks2=(1, 3))])
def test_conv_and_embedding_both_ways(kernels, tmp_path):
    peft = pytest.importorskip("peft")
    x = torch.randint(0, 10, (2, 5))
    model = conv_net(**kernels)
    inject(model, CONV_TARGETS, r=2, lora_alpha=4, bias="lora_only", modules_to_save=["head"])
    randomise_lora(model, scale=0.5, biases=True)
    ref = model(x)
    cfg = save_adapter(model, tmp_path / "ours")
    ks = {"c1": (3,), "c2": kernels.get("ks2", (3, 3)), "c3": kernels.get("ks3", (3, 3, 3))}
    for name, k in ks.items():     # exact at PEFT rank r·k1·…·kd (r where the kernel is 1)
        want = 2 * math.prod(k)
        assert cfg["rank_pattern"].get(name, cfg["r"]) == want
        assert cfg["alpha_pattern"].get(name, cfg["lora_alpha"]) == 2 * want
    pm = peft.PeftModel.from_pretrained(conv_net(**kernels), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(pm(x), ref, rtol=1e-10, atol=1e-10)

    again = conv_net(**kernels)           # our own adapter comes back as it was
    inject(again, CONV_TARGETS, r=2, lora_alpha=4)
    load_adapter(again, tmp_path / "ours")
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
    auto = conv_net(**kernels)            # auto-inject: larger ranks, same outputs
    load_adapter(auto, tmp_path / "ours")
    torch.testing.assert_close(auto(x), ref, rtol=1e-10, atol=1e-10)

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=CONV_TARGETS, bias="lora_only",
                          modules_to_save=["head"])
    pm = peft.get_peft_model(conv_net(**kernels), cfg)
    randomise_lora(pm, scale=0.5, biases=True)
    pm.eval()
    ref = pm(x)
    pm.save_pretrained(str(tmp_path / "peft"))
    auto = conv_net(**kernels)
    load_adapter(auto, tmp_path / "peft")
    torch.testing.assert_close(auto(x), ref, rtol=1e-10, atol=1e-10)
    same_r = conv_net(**kernels)
    inject(same_r, CONV_TARGETS, r=2)
    fits = math.prod(ks["c2"][1:]) <= ks["c2"][0] and math.prod(ks["c3"][1:]) <= ks["c3"][0]
    if fits:
        load_adapter(same_r, tmp_path / "peft")
        torch.testing.assert_close(same_r(x), ref, rtol=1e-10, atol=1e-10)
    else:
        snap, types = snapshot(same_r), [type(m) for m in same_r.modules()]
        with pytest.raises(AdapterError, match=r"c3.lora_A.weight.*needs r >= 6"):
            load_adapter(same_r, tmp_path / "peft")
        assert_unchanged(same_r, snap, types)


def test_conv_without_peft_form_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2))
    inject(model, ["0", "1"], r=2)
    with pytest.raises(AdapterError, match="groups=2"):
        save_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())


# -- loralib and MergedLinear ----------------------------------------------------------------

class Fused(nn.Module):
    """qkv as one layer, an output layer, an embedding and a 3×3 conv."""

    def __init__(self, lib=None):
        super().__init__()
        if lib is None:
            self.emb, self.qkv = nn.Embedding(10, 6), nn.Linear(6, 12)
            self.out, self.conv = nn.Linear(12, 6), nn.Conv2d(6, 6, 3, padding=1)
        else:
            self.emb = lib.Embedding(10, 6, r=2, lora_alpha=4)
            self.qkv = lib.MergedLinear(6, 12, r=2, lora_alpha=4,
                                        enable_lora=[True, False, True])
            self.out = lib.Linear(12, 6, r=3, lora_alpha=6)
            self.conv = lib.Conv2d(6, 6, 3, r=2, lora_alpha=4, padding=1)

    def forward(self, idx):
        h = self.out(self.qkv(self.emb(idx)))          # (B, L, 6)
        return self.conv(h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 4).contiguous())


def fused(lib=None):
    torch.manual_seed(0)
    model = Fused(lib).double()
    if lib is not None:
        lib.mark_only_lora_as_trainable(model)
        randomise_lora(model, scale=0.5)
    return model.train()


def base_of(lora_model):
    """The plain model holding a LoRA model's pretrained weights."""
    base = Fused().double()
    sd = {k.replace("conv.conv.", "conv."): v for k, v in lora_model.state_dict().items()
          if "lora_" not in k}
    base.load_state_dict(sd)
    return base.eval()


@pytest.mark.parametrize("libname", ["loralib", "lora_kernels"])
def test_loralib_layout_exports_and_imports(libname, tmp_path):
    peft = pytest.importorskip("peft")
    lib = pytest.importorskip("loralib") if libname == "loralib" else lk
    x = torch.randint(0, 10, (2, 5))
    model = fused(lib)
    ref = model(x)                    # train mode, no dropout: unmerged forward
    cfg = save_adapter(model, tmp_path)
    assert cfg["rank_pattern"]["qkv"] == 4 and cfg["alpha_pattern"]["qkv"] == 8   # r·G, α·G
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = sd["base_model.model.qkv.lora_B.weight"]
    assert b.shape == (12, 4) and not b[4:8].any() and not b[:4, 2:].any() and not b[8:, :2].any()
    assert torch.equal(sd["base_model.model.qkv.lora_A.weight"], model.qkv.lora_A.detach())
    assert sd["base_model.model.emb.lora_embedding_A"].shape == (2, 10)
    pm = peft.PeftModel.from_pretrained(base_of(model), str(tmp_path)).eval()
    torch.testing.assert_close(pm(x), ref, rtol=1e-10, atol=1e-10)

    # back through PEFT's own save into a fresh model of the same layout
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = fused(lib)
    randomise_lora(fresh, scale=2.0)
    load_adapter(fresh, tmp_path / "peft")
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    torch.testing.assert_close(fresh(x), ref, rtol=1e-12, atol=1e-12)


def test_merged_linear_refuses_adapter_without_block_layout(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"])
    pm = peft.get_peft_model(Fused().double(), cfg)
    randomise_lora(pm)                # B trained on the whole layer: no block layout
    pm.save_pretrained(str(tmp_path))
    model = fused(lk)
    snap, types = snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises(AdapterError, match=r"qkv.lora_B.weight: not the block layout"):
        load_adapter(model, tmp_path, strict=False)
    assert_unchanged(model, snap, types)


# -- bad adapters ----------------------------------------------------------------------------

def test_load_errors_change_nothing(tmp_path):
    from safetensors.torch import load_file, save_file
    model = llama()
    inject(model, LLAMA_TARGETS, r=4)
    randomise_lora(model)
    save_adapter(model, tmp_path / "good")
    sd = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    cfg = (tmp_path / "good" / "adapter_config.json").read_text()

    def write(name, tensors, config=cfg):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text(config)
        return tmp_path / name

    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    wrong = dict(sd)
    wrong[key] = torch.zeros(64, 3)
    target = llama()
    inject(target, LLAMA_TARGETS, r=4)
    snap, types = snapshot(target), [type(m) for m in target.modules()]
    with pytest.raises(AdapterError, match=rf"{key}: shape \(64, 3\), expected \(64, 4\)"):
        load_adapter(target, write("shape", wrong))
    assert_unchanged(target, snap, types)

    extra = dict(sd)
    extra["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    extra["base_model.model.lm_head.lora_B.weight"] = torch.zeros(97, 4)
    with pytest.raises(AdapterError, match="'lm_head' is a Linear, not a LoRA layer"):
        load_adapter(target, write("extra", extra))
    missing = {k: v for k, v in sd.items() if "layers.0.self_attn.q_proj" not in k}
    with pytest.raises(AdapterError, match="no tensors for the model's LoRA layers"):
        load_adapter(target, write("missing", missing))
    dora = json.loads(cfg)
    dora["use_dora"] = True
    with pytest.raises(AdapterError, match="use_dora=True"):
        load_adapter(target, write("dora", sd, json.dumps(dora)))
    assert_unchanged(target, snap, types)
    load_adapter(target, tmp_path / "missing", strict=False)

    plain = llama()                  # auto-inject, then a bad tensor: the injection is undone
    snap, types = snapshot(plain), [type(m) for m in plain.modules()]
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(plain, tmp_path / "shape")
    assert_unchanged(plain, snap, types)
    with pytest.raises(AdapterError, match="no LoRA layer"):
        load_adapter(plain, tmp_path / "good", auto_inject=False)
