"""reset_lora_parameters: fresh adapters after meta-device construction (one
process here; sharded models in tests/distributed_cases.py)."""
import math

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels import adalora


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = lk.Embedding(11, 6, r=2)
        self.qkv = lk.MergedLinear(6, 9, r=2, enable_lora=[True, False, True])
        self.out = lk.Linear(9, 4, r=3, fan_in_fan_out=True)
        self.conv = lk.Conv1d(4, 4, 3, r=2)
        self.svd = adalora.SVDLinear(4, 4, r=3)
        self.plain = nn.Linear(4, 4)


def _values(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


def test_meta_model_gets_the_constructors_adapters_and_keeps_the_rest():
    torch.manual_seed(0)
    ref = Net()
    pretrained = {k: v for k, v in ref.state_dict().items()
                  if "lora_" not in k and "ranknum" not in k}
    with torch.device("meta"):
        model = Net()
    model.to_empty(device="cpu")
    model.load_state_dict(pretrained, strict=False)
    torch.manual_seed(1)
    assert lk.reset_lora_parameters(model) == 5
    # the same draws as the constructors make, in the same order
    torch.manual_seed(1)
    for m in ref.modules():
        if isinstance(m, lk.LoRALayer):
            m.reset_lora_parameters()
    want, got = _values(ref), _values(model)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(model.qkv.lora_ind, torch.tensor([True] * 3 + [False] * 3 + [True] * 3))
    assert model.svd.scaling == ref.svd.scaling
    x = torch.randint(0, 11, (2, 5))
    h = model.out(model.qkv(model.emb(x)))
    torch.testing.assert_close(h, ref.out(ref.qkv(ref.emb(x))))


def test_layer_reset_touches_only_the_adapters():
    torch.manual_seed(0)
    layer = lk.Linear(8, 5, r=2)
    w, b = layer.weight.clone(), layer.bias.clone()
    with torch.no_grad():
        layer.lora_B.fill_(3.0)
    layer.reset_lora_parameters()
    assert torch.equal(layer.weight, w) and torch.equal(layer.bias, b)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(8)  # kaiming_uniform with a = √5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_peft_adapters_get_peft_initialisation(init):
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.Embedding(5, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2", "3"],
                                                      init_lora_weights=init))
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.fill_(7.0)
    assert lk.reset_lora_parameters(model) == 3
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n
    lin = model.base_model.model[0]
    A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    assert (A != 7).all() and A.std() > 0
    assert (torch.count_nonzero(B) == 0) == (init is not False)
    emb = model.base_model.model[3]
    assert (torch.count_nonzero(emb.lora_embedding_A["default"]) == 0) == (init is not False)
    assert emb.lora_embedding_B["default"].std() > 0


def test_peft_initialisations_that_rewrite_the_base_are_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 6)),
                                peft.LoraConfig(r=2, target_modules=["0"]))
    model.peft_config["default"].init_lora_weights = "pissa"
    with pytest.raises(ValueError, match=r"init_lora_weights .*got 'pissa'"):
        lk.reset_lora_parameters(model)
