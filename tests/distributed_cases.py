"""Two-process scenarios for tests/test_distributed.py: lora_kernels layers and
patched PEFT models under FSDP2 (``fully_shard``) and DDP, on the CPU over gloo.

    torchrun --nproc-per-node 2 tests/distributed_cases.py OUT_DIR [CASE ...]

Every case runs on both ranks, each in a fresh model; each rank writes
``OUT_DIR/rank<r>.json`` mapping a case to "ok" or the error it raised. The
references are single-process runs of the same model on the whole batch,
computed on each rank (the data and the seeds are the same on every rank).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

import lora_kernels as lk
from lora_kernels import peft_forward

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def rank() -> int:
    return dist.get_rank()


def close(got, want, what, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def rel_close(got, want, what, tol):
    """‖got − want‖ ≤ tol·‖want‖ (for bf16 runs against a bf16 reference)."""
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_params(model):
    return {n: whole(p.detach()).clone() for n, p in model.named_parameters()}


def full_grads(model):
    return {n: whole(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(got: dict, want: dict, what, **tol):
    assert got.keys() == want.keys(), f"{what}: {sorted(got)} != {sorted(want)}"
    assert got, f"{what}: nothing to compare"
    for n in got:
        close(got[n], want[n], f"{what} {n}", **tol)


def my_half(t):
    n = t.shape[0] // dist.get_world_size()
    return t[rank() * n:(rank() + 1) * n]


def out_dir(name):
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    return path


# ---------------------------------------------------------------------------
# A model of lora_kernels layers. Its shapes do not divide evenly by two
# ranks: shards cut MergedLinear's groups and leave ranks with unequal rows.
# The head is held by the root (unsharded after a forward).
# ---------------------------------------------------------------------------

VOCAB, DIM = 13, 10


class Block(nn.Module):
    def __init__(self, fan_in_fan_out: bool, p: float, dora: bool = False):
        super().__init__()
        self.qkv = lk.MergedLinear(DIM, 3 * DIM, r=2, lora_alpha=4, lora_dropout=p,
                                   enable_lora=[True, False, True],
                                   fan_in_fan_out=fan_in_fan_out)
        self.out = (lk.DoraLinear if dora else lk.Linear)(3 * DIM, DIM, r=3, lora_alpha=3,
                                                          lora_dropout=p)

    def forward(self, h):
        return h + self.out(torch.tanh(self.qkv(h)))


class Net(nn.Module):
    def __init__(self, p: float = 0.0, checkpointed: bool = False, dora: bool = False):
        super().__init__()
        self.emb = lk.Embedding(VOCAB, DIM, r=2)
        self.blocks = nn.ModuleList([Block(False, p, dora), Block(True, p, dora)])
        self.head = (lk.DoraLinear if dora else lk.Linear)(DIM, VOCAB, r=2, fan_in_fan_out=True,
                                                          lora_dropout=p)
        self.checkpointed = checkpointed

    def forward(self, idx):
        h = self.emb(idx)
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=False) if self.checkpointed else b(h)
        return self.head(h)


def make_net(**kw):
    torch.manual_seed(0)
    net = Net(**kw)
    for m in net.modules():  # non-zero B, so merges and gradients are not trivial
        if isinstance(m, lk.LoRALayer) and hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B, std=0.3)
    lk.mark_only_lora_as_trainable(net)
    return net


def shard(model, blocks, **kw):
    for b in blocks:
        fully_shard(b, **kw)
    fully_shard(model, **kw)
    return model


def tokens():
    return torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(7))


def net_loss(model, idx):
    return model(idx).float().square().mean()


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, lk.LoRALayer) and hasattr(m, "lora_A")]


@case
def layers_gradients():
    net = make_net()
    ref = copy.deepcopy(net)
    shard(net, net.blocks)
    assert isinstance(net.blocks[0].qkv.weight, DTensor)
    idx = tokens()
    net_loss(net, my_half(idx)).backward()
    net_loss(ref, idx).backward()
    compare(full_grads(net), full_grads(ref), "gradient", atol=1e-6)


def _trained(net, steps=2):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        net_loss(net, my_half(tokens())).backward()
        opt.step()
        opt.zero_grad()
    return net


def _reference_of(net, **kw):
    """An unsharded Net holding ``net``'s current (unmerged) values."""
    ref = Net(**kw)
    lk.mark_only_lora_as_trainable(ref)
    sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    ref.load_state_dict(sd)
    return ref


def _eval_train_round_trip(net, ref, tol):
    """eval() merges (outputs equal the unsharded model's), train() unmerges
    (weights back to the originals); twice, since after the first eval
    forward the root's parameters are left unsharded. A checkpoint taken
    while merged holds the unmerged weights."""
    before = full_params(net)
    idx = tokens()
    ref.eval()
    with torch.no_grad():
        want = ref(idx)
    for cycle in range(2):
        net.eval()
        assert all(m.merged for m in lora_layers(net)), "eval() did not merge"
        with torch.no_grad():
            close(net(idx).float(), want.float(), f"eval output (cycle {cycle})", **tol)
        net.train()
        assert not any(m.merged for m in lora_layers(net)), "train() did not unmerge"
        net_loss(net, my_half(idx)).backward()  # FSDP2 reshards after backward
        net.zero_grad()
        compare(full_params(net), before, f"weights after eval/train (cycle {cycle})",
                atol=1e-6)
    net.eval()
    sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    for n, v in before.items():
        close(sd[n], v, f"state_dict of the merged model, {n}", atol=1e-6)
    net.train()
    compare(full_params(net), before, "weights after a merged state_dict", atol=1e-6)
    ref.train()
    with torch.no_grad():
        close(net(idx).float(), ref(idx).float(), "train output after the round trip", **tol)


@case
def layers_eval_merges_and_train_unmerges():
    net = make_net()
    shard(net, net.blocks)
    _trained(net)
    _eval_train_round_trip(net, _reference_of(net), dict(atol=1e-5, rtol=1e-5))


@case
def dora_gradients_and_eval_round_trip():
    """DoraLinear layers (one in each block, the root's fan_in_fan_out head):
    gradients equal the unsharded model's, eval() merges W ← m/‖W + s·B·A‖ ⊙
    (W + s·B·A) on the shards and train() takes it out again."""
    net = make_net(dora=True)
    ref = copy.deepcopy(net)
    shard(net, net.blocks)
    idx = tokens()
    net_loss(net, my_half(idx)).backward()
    net_loss(ref, idx).backward()
    compare(full_grads(net), full_grads(ref), "gradient", atol=1e-6)
    net.zero_grad()
    _trained(net)
    _eval_train_round_trip(net, _reference_of(net, dora=True), dict(atol=1e-5, rtol=1e-5))


@case
def layers_eval_with_reshard_after_forward_off():
    net = make_net()
    shard(net, net.blocks)
    _trained(net)
    ref = _reference_of(net)
    net.set_reshard_after_forward(False)  # a common evaluation setting
    _eval_train_round_trip(net, ref, dict(atol=1e-5, rtol=1e-5))


@case
def layers_mixed_precision():
    net = make_net()
    ref = copy.deepcopy(net).to(torch.bfloat16)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard(net, net.blocks, mp_policy=mp)
    idx = tokens()
    net_loss(net, my_half(idx)).backward()
    net_loss(ref, idx).backward()
    got, want = full_grads(net), full_grads(ref)
    assert got.keys() == want.keys()
    for n in got:
        assert got[n].dtype == torch.float32, f"{n}: sharded gradient in {got[n].dtype}"
        rel_close(got[n], want[n], f"bf16 gradient {n}", 3e-2)
    net.zero_grad()
    before = full_params(net)
    ref32 = _reference_of(net)
    ref32.eval()
    net.eval()
    with torch.no_grad():
        rel_close(net(idx), ref32(idx), "bf16 eval output", 3e-2)
    net.train()
    compare(full_params(net), before, "fp32 weights after eval/train", atol=1e-6)


@case
def layers_activation_checkpointing():
    plain, ckpt = make_net(p=0.1), make_net(p=0.1, checkpointed=True)
    for net in (plain, ckpt):
        shard(net, net.blocks)
        torch.manual_seed(123)  # the same dropout seeds
        net_loss(net, my_half(tokens())).backward()
    compare(full_grads(ckpt), full_grads(plain), "checkpointed gradient", atol=1e-6)


@case
def layers_distributed_checkpoint():
    net = make_net()
    shard(net, net.blocks)
    _trained(net, steps=1)
    saved = full_params(net)
    path = out_dir("layers_dcp")
    net.eval()  # saved while merged: the checkpoint holds the unmerged W
    dcp.save(get_model_state_dict(net), checkpoint_id=path)
    net.train()
    _trained(net, steps=1)
    assert any(not torch.equal(v, saved[n]) for n, v in full_params(net).items())
    for mode in ("train", "eval"):
        net.train(mode == "train")
        sd = get_model_state_dict(net)
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(net, sd)
        net.train()
        compare(full_params(net), saved, f"parameters after loading in {mode} mode", atol=1e-6)


@case
def layers_adapter_on_rank_0():
    net = make_net()
    shard(net, net.blocks)
    _trained(net, steps=1)
    path = out_dir("layers_adapter")
    lk.save_adapter(net, path)            # every rank calls it; rank 0 writes
    assert os.path.exists(os.path.join(path, "adapter_model.safetensors"))
    want = full_params(net)
    plain = Net()
    plain.load_state_dict({n: v for n, v in want.items() if "lora_" not in n}, strict=False)
    lk.load_adapter(plain, path)
    compare({n: p.detach() for n, p in plain.named_parameters()}, want, "loaded adapter")
    # and back into the sharded model, each rank copying its block
    for m in lora_layers(net):
        with torch.no_grad():
            m.lora_B.zero_()
    lk.load_adapter(net, path)
    compare(full_params(net), want, "adapter loaded into the sharded model")


@case
def layers_meta_init():
    pretrained = {n: v for n, v in make_net().state_dict().items() if "lora_" not in n}
    with torch.device("meta"):
        net = Net()
    lk.mark_only_lora_as_trainable(net)
    shard(net, net.blocks)
    net.to_empty(device="cpu")
    set_model_state_dict(net, dict(pretrained),  # (it replaces the dict's values)
                         options=StateDictOptions(full_state_dict=True, strict=False))
    torch.manual_seed(5)
    assert lk.reset_lora_parameters(net) == 6
    ref = Net()
    lk.mark_only_lora_as_trainable(ref)
    ref.load_state_dict(pretrained, strict=False)
    torch.manual_seed(5)
    lk.reset_lora_parameters(ref)
    compare(full_params(net), {n: p.detach() for n, p in ref.named_parameters()},
            "meta-initialised parameters", atol=0, rtol=0)
    A = whole(net.blocks[0].qkv.lora_A)
    assert not torch.equal(A[:2], A[2:]), "every rank drew the same rows"
    for a, b in zip(net.buffers(), ref.buffers()):
        assert torch.equal(a, b), "buffers (MergedLinear.lora_ind) not set"
    idx = tokens()
    net_loss(net, my_half(idx)).backward()
    net_loss(ref, idx).backward()
    compare(full_grads(net), full_grads(ref), "gradient after meta init", atol=1e-6)


@case
def merge_on_any_placement():
    """functional.merge_/unmerge_ on a DTensor W against the same merge of the
    whole W: Shard(0), Shard(1) and Replicate, with fan_in_fan_out and groups
    (shards that cut a group in two), A and B sharded or plain."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(4)
    for fifo in (False, True):
        for enable in ([True], [True, False, True]):
            out_f, in_f, r = 9 * len(enable), 7, 2
            e = sum(enable)
            W = torch.randn(*((in_f, out_f) if fifo else (out_f, in_f)), generator=g)
            A = torch.randn(r * e, in_f, generator=g)
            B = torch.randn(out_f // len(enable) * e, r, generator=g)
            want = W.clone()
            lk.functional.merge_(want, A, B, 0.7, fifo, enable)
            for place in (Shard(0), Shard(1), Replicate()):
                for ab in ("sharded", "plain"):
                    Wd = distribute_tensor(W.clone(), mesh, [place])
                    Ad, Bd = ((distribute_tensor(A, mesh, [Shard(0)]),
                               distribute_tensor(B, mesh, [Shard(0)]))
                              if ab == "sharded" else (A, B))
                    what = f"fifo={fifo} enable={enable} {place} A/B {ab}"
                    lk.functional.merge_(Wd, Ad, Bd, 0.7, fifo, enable)
                    close(Wd.full_tensor(), want, f"merged, {what}", atol=1e-6)
                    lk.functional.unmerge_(Wd, Ad, Bd, 0.7, fifo, enable)
                    close(Wd.full_tensor(), W, f"unmerged, {what}", atol=1e-6)


class ConvNet(nn.Module):
    """Convolutions whose merge views a sharded (out, in, k, k) weight as rows."""

    def __init__(self):
        super().__init__()
        self.c1 = lk.Conv2d(3, 5, 3, r=2, lora_alpha=2, padding=1)
        self.c2 = lk.Conv1d(5, 4, 3, r=2, lora_alpha=2)

    def forward(self, x):
        h = torch.tanh(self.c1(x))                    # (N, 5, H, W)
        return self.c2(h.flatten(2))                  # (N, 4, H·W - 2)


@case
def layers_conv():
    torch.manual_seed(0)
    net = ConvNet()
    for m in (net.c1, net.c2):
        nn.init.normal_(m.lora_B, std=0.3)
    lk.mark_only_lora_as_trainable(net)
    ref = copy.deepcopy(net)
    shard(net, [net.c1])
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    net(my_half(x)).square().mean().backward()
    ref(x).square().mean().backward()
    compare(full_grads(net), full_grads(ref), "conv gradient", atol=1e-6)
    net.zero_grad()
    ref.zero_grad()
    before = full_params(net)
    net.eval()
    ref.eval()
    with torch.no_grad():
        close(net(x), ref(x), "conv eval output")
    net.train()
    net(my_half(x)).square().mean().backward()
    net.zero_grad()
    compare(full_params(net), before, "conv weights after eval/train", atol=1e-6)


@case
def inject_refuses_a_sharded_model():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    fully_shard(model[0])
    fully_shard(model)
    try:
        lk.inject(model, ["0", "2"], r=2)
    except ValueError as e:
        assert "inject LoRA layers first, then shard" in str(e), e
    else:
        raise AssertionError("inject changed a sharded model")
    assert all(type(m) in (nn.Linear, nn.Tanh) or "FSDP" in type(m).__name__
               for m in model), "a layer was replaced"


@case
def layers_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = make_net()
    ref = copy.deepcopy(net)
    ddp = DDP(net)
    idx = tokens()
    net_loss(ddp, my_half(idx)).backward()
    net_loss(ref, idx).backward()
    compare(full_grads(net), full_grads(ref), "DDP gradient", atol=1e-6)
    net.zero_grad()
    ref.load_state_dict(net.state_dict())
    ddp.eval()
    with torch.no_grad():
        ddp(idx)
    ddp.train()
    _eval_train_round_trip(net, ref, dict(atol=1e-6, rtol=1e-6))


# ---------------------------------------------------------------------------
# PEFT: a small Llama from a config, LoRA on its seven projections
# ---------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = []


def _count_fused_calls():
    """Count the patched layers' calls of the fused op (proof they ran fused)."""
    inner = peft_forward.LF.lora_linear

    def counted(*args, **kwargs):
        FUSED.append(1)
        return inner(*args, **kwargs)
    peft_forward.LF.lora_linear = counted


def llama_config():
    import transformers
    return transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, max_position_embeddings=32)


def make_peft(p=0.0, device=None):
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        base = transformers.LlamaForCausalLM(llama_config())
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                target_modules=TARGETS))
    if device is None:
        for n, q in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(q, std=0.1)
    return model


def decoder_layers(model):
    return model.base_model.model.model.layers


def llama_ids():
    return torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(3))


def peft_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _peft_sharded(when, **kw):
    model = make_peft(**kw.pop("make", {}))
    ref = copy.deepcopy(model)
    if when == "before":
        report = lk.patch_peft(model, verbose=False)
    shard(model, decoder_layers(model), **kw)
    if when == "after":
        report = lk.patch_peft(model, verbose=False)
    assert len(report.patched) == 14 and not report.deferred, report.as_dict()
    return model, ref


def _same_gradients(model, ref):
    """One step of the sharded, patched ``model`` on this rank's half runs
    fused and gives the gradients of unpatched ``ref`` on the whole batch."""
    ids = llama_ids()
    FUSED.clear()
    peft_loss(model, my_half(ids)).backward()
    assert len(FUSED) == 14, f"{len(FUSED)} fused calls, expected 14"
    peft_loss(ref, ids).backward()
    compare(full_grads(model), full_grads(ref), "PEFT LoRA gradient", atol=1e-6)


def _peft_gradients(when):
    model, ref = _peft_sharded(when)
    _same_gradients(model, ref)
    return model, ref


@case
def peft_patched_before_fully_shard():
    _peft_gradients("before")


@case
def peft_patched_after_fully_shard():
    model, ref = _peft_gradients("after")
    ids = llama_ids()
    model.eval()
    ref.eval()
    with torch.no_grad():
        close(model(input_ids=ids).logits, ref(input_ids=ids).logits, "eval logits")
    model.train()


@case
def peft_layers_sharded_one_by_one():
    """fully_shard on each LoRA layer itself (FSDP2 swaps in a class of its own)."""
    from peft.tuners.lora.layer import LoraLayer
    model = make_peft()
    ref = copy.deepcopy(model)
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in lora:
        fully_shard(m)
    fully_shard(model)
    report = lk.patch_peft(model, verbose=False)
    assert len(report.patched) == 14 and not report.deferred, report.as_dict()
    _same_gradients(model, ref)


@case
def peft_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = make_peft()
    ref = copy.deepcopy(model)
    assert len(lk.patch_peft(model, verbose=False).patched) == 14
    ddp = DDP(model)  # (kept alive through backward: its reducer all-reduces there)
    ids = llama_ids()
    FUSED.clear()
    peft_loss(ddp, my_half(ids)).backward()
    assert len(FUSED) == 14, f"{len(FUSED)} fused calls, expected 14"
    peft_loss(ref, ids).backward()
    compare(full_grads(model), full_grads(ref), "DDP PEFT LoRA gradient", atol=1e-6)


@case
def peft_mixed_precision():
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, ref = _peft_sharded("after", mp_policy=mp)
    ref.to(torch.bfloat16)
    ids = llama_ids()
    FUSED.clear()
    peft_loss(model, my_half(ids)).backward()
    assert len(FUSED) == 14, f"{len(FUSED)} fused calls under bf16, expected 14"
    peft_loss(ref, ids).backward()
    got, want = full_grads(model), full_grads(ref)
    assert got.keys() == want.keys()
    for n in got:
        rel_close(got[n], want[n], f"bf16 gradient {n}", 5e-2)


@case
def peft_activation_checkpointing():
    grads = []
    for ckpt in (False, True):
        model, _ = _peft_sharded("after", make=dict(p=0.05))
        if ckpt:  # transformers' own switch (renamed in transformers 5)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        torch.manual_seed(11)
        peft_loss(model, my_half(llama_ids())).backward()
        grads.append(full_grads(model))
    compare(grads[1], grads[0], "checkpointed PEFT gradient", atol=1e-6)


@case
def peft_distributed_checkpoint():
    model, _ = _peft_sharded("after")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    peft_loss(model, my_half(llama_ids())).backward()
    opt.step()
    opt.zero_grad()
    saved = full_params(model)
    path = out_dir("peft_dcp")
    dcp.save(get_model_state_dict(model), checkpoint_id=path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.zero_()
    sd = get_model_state_dict(model)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd)
    compare(full_params(model), saved, "parameters after loading", atol=0, rtol=0)


@case
def peft_adapter_on_rank_0():
    from peft import PeftModel
    model, _ = _peft_sharded("after")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    peft_loss(model, my_half(llama_ids())).backward()
    opt.step()
    want = {n: v for n, v in full_params(model).items() if "lora_" in n}
    path = out_dir("peft_adapter")
    lk.save_adapter(model, path)          # every rank calls it; rank 0 writes
    import transformers
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config())
    loaded = PeftModel.from_pretrained(base, path)
    got = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    compare(got, want, "adapter loaded by PeftModel.from_pretrained", atol=0, rtol=0)


@case
def peft_meta_init():
    plain = make_peft()
    pretrained = {n: v for n, v in plain.state_dict().items() if "lora_" not in n}
    model = make_peft(device="meta")
    shard(model, decoder_layers(model))
    model.to_empty(device="cpu")
    set_model_state_dict(model, dict(pretrained),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    with torch.no_grad():  # buffers outside the checkpoint (rotary frequencies)
        for (n, b), (m, c) in zip(model.named_buffers(), plain.named_buffers()):
            assert n == m
            b.copy_(c)
    torch.manual_seed(9)
    assert lk.reset_lora_parameters(model) == 14
    report = lk.patch_peft(model, verbose=False)
    assert len(report.patched) == 14
    ref = make_peft()
    torch.manual_seed(9)
    lk.reset_lora_parameters(ref)
    compare({n: v for n, v in full_params(model).items() if "lora_" in n},
            {n: p.detach() for n, p in ref.named_parameters() if "lora_" in n},
            "meta-initialised adapters", atol=0, rtol=0)
    A = whole(decoder_layers(model)[0].self_attn.q_proj.lora_A["default"].weight)
    assert not torch.equal(A[:2], A[2:]), "every rank drew the same rows"
    # B starts at zero: give both the same B so the gradients are not trivial.
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.1)
    set_model_state_dict(model, {n: v for n, v in ref.state_dict().items() if "lora_B" in n},
                         options=StateDictOptions(full_state_dict=True, strict=False))
    ids = llama_ids()
    peft_loss(model, my_half(ids)).backward()
    peft_loss(ref, ids).backward()
    compare(full_grads(model), full_grads(ref), "gradient after meta init", atol=1e-6)


def main():
    global OUT
    OUT = sys.argv[1]
    wanted = sys.argv[2:] or list(CASES)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    _count_fused_calls()
    results = {}
    for name in wanted:
        try:
            CASES[name]()
            results[name] = "ok"
        except ImportError as e:  # peft / transformers are optional
            results[name] = f"skip: {e}"
        except Exception:  # noqa: BLE001 - reported to the test, per case
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(OUT, f"rank{rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


OUT = ""

if __name__ == "__main__":
    main()
