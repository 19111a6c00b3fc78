"""AdaLoRA: SVDLinear against the formula and PEFT's SVDLinear, RankAllocator and the
orthogonal regulariser against PEFT's, rank patterns, the Trainer callback, errors."""
import copy
import json
import pickle
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels import adalora
from lora_kernels import reference as R
from lora_kernels.adalora import RankAllocator, SVDLinear
from tolerances import TOL

F64 = TOL[torch.float64]


def _randomise(layer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def _formula(x, w, b, A, E, B, alpha, r, fan_in_fan_out=False, x_branch=None):
    """Plain PyTorch: x·Wᵀ + b + alpha/(r + 1e-5)·x·(A⊙E)ᵀ·Bᵀ."""
    w = w.T if fan_in_fan_out else w
    x_branch = x if x_branch is None else x_branch
    return F.linear(x, w, b) + (x_branch @ (A * E).T @ B.T) * alpha / (r + 1e-5)


# -- SVDLinear -------------------------------------------------------------------------
def test_init_matches_peft_and_starts_as_the_plain_linear():
    torch.manual_seed(0)
    layer = SVDLinear(64, 48, r=6, lora_alpha=12)
    assert layer.lora_A.shape == (6, 64) and layer.lora_E.shape == (6, 1)
    assert layer.lora_B.shape == (48, 6)
    assert torch.count_nonzero(layer.lora_E) == 0
    for p in (layer.lora_A, layer.lora_B):
        assert abs(p.mean().item()) < 0.005 and 0.017 < p.std().item() < 0.023
    assert layer.ranknum.tolist() == [6.0] and "ranknum" in dict(layer.named_buffers())
    assert layer.scaling == 12 / (6 + 1e-5)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert SVDLinear(4, 3, r=2, lora_alpha=0).scaling == 2 / (2 + 1e-5)   # PEFT: alpha<=0 → r


def test_loralib_helpers():
    model = nn.Sequential(SVDLinear(6, 5, r=3), nn.Linear(5, 2))
    lk.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_E", "0.lora_B"}
    assert set(lk.lora_state_dict(model)) == {"0.lora_A", "0.lora_E", "0.lora_B"}
    assert "0.ranknum" in model.state_dict()


@pytest.mark.parametrize("fan_in_fan_out,bias", [(False, True), (True, True), (False, False)])
def test_forward_backward_equal_the_formula_in_float64(backend, fan_in_fan_out, bias):
    layer = _randomise(SVDLinear(7, 5, r=3, lora_alpha=4, fan_in_fan_out=fan_in_fan_out,
                                 bias=bias).double())
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    leaves = [t.detach().clone().requires_grad_() for t in
              (x, layer.lora_A, layer.lora_E, layer.lora_B)]
    ref = _formula(leaves[0], layer.weight, layer.bias, *leaves[1:], 4, 3, fan_in_fan_out)
    torch.testing.assert_close(y, ref, **F64)
    ref.backward(g)
    for got, want in zip((x, layer.lora_A, layer.lora_E, layer.lora_B), leaves):
        assert got.grad is not None and torch.count_nonzero(got.grad) > 0
        torch.testing.assert_close(got.grad, want.grad, **F64)


def test_dropout_is_applied_to_the_branch_input(backend):
    layer = _randomise(SVDLinear(10, 6, r=3, lora_alpha=2, lora_dropout=0.3,
                                 merge_weights=False).double())
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.manual_seed(9)
    y = layer(x)
    torch.manual_seed(9)
    dropped = R.dropout(x, lk.functional.draw_seed("cpu"), 0.3)
    torch.testing.assert_close(y, _formula(x, layer.weight, layer.bias, layer.lora_A,
                                           layer.lora_E, layer.lora_B, 2, 3,
                                           x_branch=dropped), **F64)
    layer.eval()
    torch.testing.assert_close(layer(x), _formula(x, layer.weight, layer.bias, layer.lora_A,
                                                  layer.lora_E, layer.lora_B, 2, 3), **F64)


def test_merge_unmerge_round_trip_and_unmerged_checkpoints(backend):
    layer = _randomise(SVDLinear(33, 17, r=4, lora_alpha=8)).double()
    x = torch.randn(5, 33, dtype=torch.float64)
    y_train = layer(x)
    w0 = layer.weight.detach().clone()
    for _ in range(3):
        layer.eval()
        assert layer.merged
        torch.testing.assert_close(layer.weight, w0 + layer.delta_weight().detach(), **F64)
        torch.testing.assert_close(layer(x), y_train, **F64)
        torch.testing.assert_close(layer.state_dict()["weight"], w0, **F64)   # unmerged W
        layer.train()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-12)

    # A checkpoint loaded into a merged layer: re-merged with its A, E, B and ranknum.
    other = _randomise(SVDLinear(33, 17, r=4, lora_alpha=8), seed=7).double()
    other.set_ranknum(2.0)
    layer.eval()
    layer.load_state_dict(other.state_dict())
    assert layer.scaling == 8 / (2 + 1e-5)
    other.eval()
    torch.testing.assert_close(layer(x), other(x), **F64)
    layer.train()
    torch.testing.assert_close(layer.weight, other.state_dict()["weight"], rtol=0, atol=1e-12)


def test_pickle_deepcopy_and_compile(backend):
    layer = _randomise(SVDLinear(8, 6, r=3, lora_alpha=4, lora_dropout=0.1)).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    layer.eval()
    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(twin(x), layer(x), **F64)
        torch.testing.assert_close(twin.state_dict()["weight"], layer.state_dict()["weight"])
    layer.train()
    torch.manual_seed(4)
    eager = layer(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_E, layer.lora_B)]
    layer.zero_grad()
    torch.manual_seed(4)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, **F64)
    for p, g in zip((layer.lora_A, layer.lora_E, layer.lora_B), grads):
        torch.testing.assert_close(p.grad, g, **F64)


# -- against PEFT ------------------------------------------------------------------------
try:
    import peft
except ImportError:
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs peft")

DIMS = [(10, 16), (16, 12), (12, 3)]
CFG = dict(init_r=4, target_r=2, tinit=3, tfinal=5, deltaT=3, total_step=20, beta1=0.85,
           beta2=0.85, orth_reg_weight=0.3)


class MLP(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (make(i, o) for i, o in DIMS)

    def forward(self, x, labels=None):
        out = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return types.SimpleNamespace(logits=out, loss=F.mse_loss(out, labels))


def _pair(lora_alpha=8):
    """A PEFT AdaLoRA model and ours with identical weights (float64)."""
    torch.manual_seed(0)
    base = MLP(nn.Linear)
    cfg = peft.AdaLoraConfig(target_modules=["fc1", "fc2", "fc3"], lora_alpha=lora_alpha,
                             **CFG)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).double()
    ours = MLP(lambda i, o: SVDLinear(i, o, r=CFG["init_r"], lora_alpha=lora_alpha)).double()
    lk.mark_only_lora_as_trainable(ours)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            mod, leaf = n.rsplit(".", 1)
            key = (f"base_model.model.{mod}.base_layer.{leaf}" if leaf in ("weight", "bias")
                   else f"base_model.model.{mod}.{leaf}.default")
            p.copy_(peft_params[key])
    return theirs, ours


def _peft_layer(theirs, name):
    return getattr(theirs.base_model.model, name)


@needs_peft
def test_svd_linear_equals_peft_svd_linear():
    theirs, ours = _pair()
    for name in ("fc1", "fc2", "fc3"):
        _randomise(getattr(ours, name))
        with torch.no_grad():
            _peft_layer(theirs, name).lora_A.default.copy_(getattr(ours, name).lora_A)
            _peft_layer(theirs, name).lora_E.default.copy_(getattr(ours, name).lora_E)
            _peft_layer(theirs, name).lora_B.default.copy_(getattr(ours, name).lora_B)
    x = torch.randn(6, 10, dtype=torch.float64)
    labels = torch.randn(6, 3, dtype=torch.float64)
    a, b = theirs(x, labels), ours(x, labels)
    torch.testing.assert_close(b.logits, a.logits, **F64)
    a.loss.backward()
    b.loss.backward()
    for name in ("fc1", "fc2", "fc3"):
        for kind in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(getattr(ours, name), kind).grad,
                                       getattr(_peft_layer(theirs, name), kind).default.grad,
                                       **F64)
    theirs.base_model.merge_adapter()
    ours.eval()
    for name in ("fc1", "fc2", "fc3"):
        torch.testing.assert_close(getattr(ours, name).weight,
                                   _peft_layer(theirs, name).base_layer.weight, **F64)


def _strip(pattern):
    return {k.replace(".default", ""): v for k, v in pattern.items()}


def _e_masks(model, peft_model=False):
    if peft_model:
        return {n: (getattr(_peft_layer(model, n), "lora_E").default == 0).view(-1).tolist()
                for n in ("fc1", "fc2", "fc3")}
    return {n: (getattr(model, n).lora_E == 0).view(-1).tolist() for n in ("fc1", "fc2", "fc3")}


@pytest.fixture(scope="module")
def parity_run():
    """PEFT's AdaLoRA and ours over all 20 steps (every phase), same data and AdamW."""
    theirs, ours = _pair()
    allocator = RankAllocator(ours, **CFG)
    hook = allocator.register_orthogonal_regularization(ours)
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(0)   # a final pattern with ranks 2, 1, 3
    log = []
    for step in range(CFG["total_step"]):
        x = torch.randn(8, 10, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        # AdaLoraModel.forward adds the orthogonal regulariser (PeftModel.forward skips it).
        loss_t = theirs.base_model(x, labels=y).loss
        loss_o = ours(x, labels=y).loss
        loss_t.backward()
        loss_o.backward()
        opt_t.step()
        opt_o.step()
        theirs.base_model.update_and_allocate(step)
        budget, _ = allocator.update_and_allocate(ours, step)
        peft_pattern = theirs.peft_config["default"].rank_pattern
        log.append(dict(step=step, loss=(loss_t.item(), loss_o.item()), budget=budget,
                        peft_budget=theirs.base_model.rankallocator.budget_schedule(step)[0],
                        masks=(_e_masks(theirs, True), _e_masks(ours)),
                        patterns=(peft_pattern and _strip(peft_pattern), allocator.rank_pattern)))
        opt_t.zero_grad()
        opt_o.zero_grad()
    hook.remove()
    return theirs, ours, allocator, log


@needs_peft
def test_rank_allocator_matches_peft_step_by_step(parity_run):
    theirs, ours, allocator, log = parity_run
    end = CFG["total_step"] - CFG["tfinal"]
    init_bgt, target_bgt = 3 * CFG["init_r"], 3 * CFG["target_r"]
    for entry in log:
        step = entry["step"]
        assert entry["loss"][1] == pytest.approx(entry["loss"][0], rel=1e-10), step
        assert entry["masks"][1] == entry["masks"][0], step
        assert entry["patterns"][1] == entry["patterns"][0], step
        assert entry["budget"] == (entry["peft_budget"] if step <= end else target_bgt)
    budgets = [e["budget"] for e in log]
    assert budgets[:CFG["tinit"] + 1] == [init_bgt] * (CFG["tinit"] + 1)
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and budgets[end:] == \
        [target_bgt] * (CFG["total_step"] - end)
    # Masking happened during the decrease and the final pattern keeps the target budget.
    assert any(any(any(m) for m in e["masks"][1].values()) for e in log if e["step"] < end)
    final = allocator.rank_pattern
    assert sum(map(sum, final.values())) == target_bgt
    assert len({sum(keep) for keep in final.values()}) > 1   # the budget moved between layers
    for name, keep in final.items():
        assert (getattr(ours, name[:-len(".lora_E")]).lora_E.view(-1)[~torch.tensor(keep)]
                == 0).all()
    for n, p in ours.named_parameters():
        mod, leaf = n.rsplit(".", 1)
        if leaf.startswith("lora_"):
            torch.testing.assert_close(p, getattr(_peft_layer(theirs, mod), leaf).default,
                                       rtol=1e-9, atol=1e-12)


@needs_peft
def test_orthogonal_regularization_equals_peft():
    theirs, ours = _pair()
    for name in ("fc1", "fc2", "fc3"):
        _randomise(getattr(ours, name))
        for kind in ("lora_A", "lora_E", "lora_B"):
            with torch.no_grad():
                getattr(_peft_layer(theirs, name), kind).default.copy_(
                    getattr(getattr(ours, name), kind))
    x = torch.randn(4, 10, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    peft_reg = theirs.base_model(x, labels=y).loss - theirs(x, labels=y).loss
    allocator = RankAllocator(ours, **CFG)
    ours_reg = allocator.orthogonal_regularization(ours)
    torch.testing.assert_close(ours_reg, peft_reg, **F64)
    # Its definition: weight × mean of the Frobenius norms (not squared) over A and B.
    mats = [m for layer in (ours.fc1, ours.fc2, ours.fc3)
            for m in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B)]
    expected = 0.3 * sum(torch.linalg.matrix_norm(m - torch.eye(len(m), dtype=m.dtype))
                         for m in mats) / len(mats)
    torch.testing.assert_close(ours_reg, expected, **F64)
    ours_reg.backward()
    assert ours.fc1.lora_A.grad is not None and ours.fc1.lora_B.grad is not None


@needs_peft
def test_rank_pattern_save_load_mask_and_resize(parity_run, tmp_path):
    theirs, ours, allocator, _ = parity_run
    path = tmp_path / "rank_pattern.json"
    path.write_text(json.dumps(allocator.rank_pattern))
    pattern = json.loads(path.read_text())
    x = torch.randn(5, 10, dtype=torch.float64)
    y = torch.zeros(5, 3, dtype=torch.float64)

    # Full-size layers with E entries the optimizer revived: masking restores the pattern.
    masked = copy.deepcopy(ours)
    with torch.no_grad():
        for name in ("fc1", "fc2", "fc3"):
            e = getattr(masked, name).lora_E
            e.copy_(torch.where(e == 0, 1.0, e))
    adalora.mask_using_rank_pattern(masked, pattern)
    assert _e_masks(masked) == {k[:-len(".lora_E")]: [not v for v in keep]
                                for k, keep in pattern.items()}
    torch.testing.assert_close(masked(x, y).logits, ours(x, y).logits, **F64)

    # Resizing drops the pruned triplets, keeps ranknum and the output (PEFT does it on load).
    resized = copy.deepcopy(ours).eval()
    adalora.resize_by_rank_pattern(resized, pattern)
    peft_resized = copy.deepcopy(theirs)
    peft_resized.base_model.resize_modules_by_rank_pattern(
        theirs.peft_config["default"].rank_pattern, "default")
    for name in ("fc1", "fc2", "fc3"):
        layer, ref = getattr(resized, name), _peft_layer(peft_resized, name)
        assert layer.r == sum(pattern[f"{name}.lora_E"]) == ref.r["default"]
        assert layer.ranknum.item() == CFG["init_r"] == ref.ranknum["default"].item()
        for kind in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(layer, kind), getattr(ref, kind).default,
                                       rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(resized(x, y).logits, ours.eval()(x, y).logits, **F64)
    ours.train()
    resized.train()
    torch.testing.assert_close(resized(x, y).logits, ours(x, y).logits, **F64)

    # A LoRA checkpoint of the resized model loads into a fresh model resized the same way.
    fresh = MLP(lambda i, o: SVDLinear(i, o, r=CFG["init_r"], lora_alpha=8)).double()
    fresh.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k},
                          strict=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        copy.deepcopy(fresh).load_state_dict(lk.lora_state_dict(resized), strict=False)
    adalora.resize_by_rank_pattern(fresh, pattern)
    fresh.load_state_dict(lk.lora_state_dict(resized), strict=False)
    torch.testing.assert_close(fresh(x, y).logits, ours(x, y).logits, **F64)

    # The allocator takes a saved pattern and re-applies it in the final phase.
    again = copy.deepcopy(ours)
    with torch.no_grad():
        again.fc1.lora_E.fill_(1.0)
    alloc = RankAllocator(again, rank_pattern=pattern, **{**CFG, "init_r": None})
    budget, applied = alloc.update_and_allocate(again, CFG["total_step"])
    assert budget == 3 * CFG["target_r"] and applied == pattern
    assert _e_masks(again)["fc1"] == [not v for v in pattern["fc1.lora_E"]]


def test_resize_to_rank_zero_runs_as_the_plain_linear(backend):
    layer = _randomise(SVDLinear(6, 4, r=3, lora_alpha=2)).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    layer.resize_([False, True, False])
    assert layer.r == 1 and layer.lora_A.shape == (1, 6) and layer.ranknum.item() == 3
    torch.testing.assert_close(layer(x), _formula(x, layer.weight, layer.bias, layer.lora_A,
                                                  layer.lora_E, layer.lora_B, 2, 3), **F64)
    layer.resize_([False])
    assert layer.r == 0 and layer.lora_A.shape == (0, 6) and layer.lora_B.shape == (4, 0)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.eval()
    layer.train()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


# -- errors --------------------------------------------------------------------------------
def _model():
    return nn.Sequential(SVDLinear(6, 5, r=4), SVDLinear(5, 3, r=4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_step=None), r"total_step: got None, expected an integer > 0"),
    (dict(total_step=0), r"total_step: got 0, expected an integer >= 1"),
    (dict(target_r=5), r"target_r: got 5, expected at most init_r=4"),
    (dict(init_r=3), r"init_r: got 3, expected the rank of every SVDLinear layer \('0'"),
    (dict(tinit=6, tfinal=4), r"tinit: got 6, expected < total_step - tfinal = 10 - 4 = 6"),
    (dict(tinit=10), r"tinit: got 10, expected < total_step - tfinal"),
    (dict(deltaT=0), r"deltaT: got 0, expected an integer >= 1"),
    (dict(beta1=1.0), r"beta1: got 1.0, expected a float in \(0, 1\)"),
    (dict(beta2=0), r"beta2: got 0, expected a float in \(0, 1\)"),
    (dict(orth_reg_weight=-0.1), r"orth_reg_weight: got -0.1, expected a float >= 0"),
    (dict(tfinal=-1), r"tfinal: got -1, expected an integer >= 0"),
    (dict(rank_pattern={"2.lora_E": [True] * 4}), r"rank_pattern key: got '2.lora_E'"),
    (dict(rank_pattern={"0.lora_E": [True] * 3}),
     r"rank_pattern\['0.lora_E'\]: got 3 values of torch.bool, expected 4 bools"),
])
def test_bad_allocator_arguments(kwargs, match):
    args = dict(target_r=2, total_step=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RankAllocator(_model(), **args)


def test_bad_model_and_layer_arguments():
    with pytest.raises(ValueError, match=r"model: got 'Sequential', expected a model with "
                                         r"SVDLinear layers"):
        RankAllocator(nn.Sequential(nn.Linear(2, 2), SVDLinear(2, 2, r=0)), total_step=10)
    with pytest.raises(ValueError, match=r"r: got -1, expected an integer >= 0"):
        SVDLinear(4, 3, r=-1)
    with pytest.raises(ValueError, match=r"lora_dropout: got 1.0, expected a float in \[0, 1\)"):
        SVDLinear(4, 3, r=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"rank_pattern: got None, expected a rank pattern"):
        RankAllocator(_model(), target_r=2, total_step=10).mask_using_rank_pattern(_model())


def test_update_without_gradients_or_scores_says_what_is_missing():
    model = _model()
    allocator = RankAllocator(model, target_r=2, total_step=10)
    model(torch.randn(2, 6)).sum().backward()
    model.zero_grad()
    with pytest.raises(RuntimeError, match=r"0.lora_A has no gradient: call update_and_"
                                           r"allocate after backward\(\) and before"):
        allocator.update_and_allocate(model, 0)
    with pytest.raises(RuntimeError, match=r"0.lora_A has no importance score yet"):
        allocator.update_and_allocate(model, 10)   # total_step - tfinal, no step before it


# -- Trainer --------------------------------------------------------------------------------
def test_import_does_not_need_transformers():
    code = ("import sys; import lora_kernels.adalora as a; "
            "assert 'transformers' not in sys.modules, 'imported'; "
            "assert callable(a.RankAllocator)")
    subprocess.run([sys.executable, "-c", code], check=True)


class _Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = SVDLinear(8, 16, r=4, lora_alpha=8)
        self.fc2 = SVDLinear(16, 1, r=4, lora_alpha=8)

    def forward(self, x, labels=None):
        out = self.fc2(torch.relu(self.fc1(x))).squeeze(-1)
        return {"loss": F.mse_loss(out, labels), "logits": out}


def test_trainer_callback_shrinks_the_budget(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _Regressor()
    lk.mark_only_lora_as_trainable(model)
    allocator = RankAllocator(model, target_r=1, init_r=4, tinit=2, tfinal=3, deltaT=1,
                              total_step=12)
    allocator.register_orthogonal_regularization(model)
    callback = adalora.AdaLoraCallback(allocator)
    assert isinstance(callback, transformers.TrainerCallback)
    w = torch.randn(8)
    data = [{"x": x, "labels": (x @ w).float()} for x in torch.randn(48, 8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[callback])
    trainer.train()
    steps, budgets = zip(*callback.history)
    assert steps == tuple(range(12))
    assert budgets[:3] == (8, 8, 8) and budgets[-4:] == (2, 2, 2, 2)
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and len(set(budgets)) > 3
    kept = sum(map(sum, allocator.rank_pattern.values()))
    assert kept == 2
    assert int((model.fc1.lora_E != 0).sum() + (model.fc2.lora_E != 0).sum()) == kept
