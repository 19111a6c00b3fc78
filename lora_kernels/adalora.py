"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512) in loralib style, on the fused op.

AdaLoRA writes the update in SVD form, ΔW = B·(A⊙E)·scaling, with A (r×in)
the right singular vectors, E (r×1) the singular values and B (out×r) the left
ones, and prunes singular values during training so that the rank budget goes
where it matters. As in PEFT (and the AdaLoRA paper's code),
``scaling = lora_alpha / (ranknum + 1e-5)`` where ``ranknum`` is the layer's
initial rank (a buffer; pruning zeroes E, it does not change ``ranknum``)::

    import lora_kernels as lora
    from lora_kernels.adalora import RankAllocator, SVDLinear

    model.q = SVDLinear(1024, 1024, r=12, lora_alpha=32, lora_dropout=0.05)
    lora.mark_only_lora_as_trainable(model)
    allocator = RankAllocator(model, target_r=8, init_r=12, tinit=200, tfinal=1000,
                              deltaT=10, total_step=3000)
    for step, batch in enumerate(loader):
        loss = loss_fn(model(batch)) + allocator.orthogonal_regularization(model)
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(model, step)   # grads still present
        optimizer.zero_grad()

With the transformers ``Trainer``, pass ``callbacks=[AdaLoraCallback(allocator)]``
(it calls ``update_and_allocate`` after the optimizer step and before
``zero_grad``) and ``allocator.register_orthogonal_regularization(model)`` adds
the regulariser to the model output's ``loss``, as PEFT's AdaLoraModel does.

The budget is the total number of singular values kept over all SVDLinear
layers; it starts at Σ r (``init_r`` per layer) and ends at
``target_r × number of layers``. ``update_and_allocate(model, step)`` runs
three phases:

1. warm-up, ``step <= tinit``: the full budget; importance scores are
   accumulated, nothing is masked;
2. budget decrease, ``tinit < step < total_step - tfinal``: the budget
   follows a cubic schedule from the initial to the target budget,
   ``target + (init - target)·(1 - (step - tinit)/(total_step - tfinal - tinit))³``
   (truncated to an integer), and every ``deltaT`` steps the E entries of the
   least important triplets (A row, E entry, B column) are set to zero so that
   at most that many remain, anywhere in the model;
3. final fine-tuning, ``step >= total_step - tfinal``: at ``total_step - tfinal``
   the target budget is allocated one last time and the rank pattern is
   fixed; on every later step the same E entries are zeroed again (the
   optimizer could otherwise revive them), and no scores are computed.

A triplet's importance is the sum of its E entry's score and the mean scores
of its A row and B column. An entry's score is the product of its smoothed
sensitivity Ī (EMA of |p·∂L/∂p| with ``beta1``) and uncertainty Ū (EMA of
|I − Ī| with ``beta2``). All of this mirrors PEFT's ``RankAllocator`` and
``AdaLoraModel.update_and_allocate`` step for step, so the same weights and
gradients give the same budgets, masks and rank pattern.

The rank pattern, ``{"<layer>.lora_E": [bool] * r}`` (PEFT's key format
without the adapter name), is a plain dict (JSON or ``torch.save``). On load,
``mask_using_rank_pattern`` zeroes the dropped E entries of full-size layers;
``resize_by_rank_pattern`` drops the pruned triplets from A, E and B, which is
what PEFT does when it loads an AdaLoRA adapter: ``ranknum`` and so the
scaling stay as trained, and the layer's output does not change.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from . import functional as LF
from .layers import LoRALayer, _check_r

RankPattern = Dict[str, List[bool]]


def _fail(name: str, got, expected) -> None:
    raise ValueError(f"{name}: got {got!r}, expected {expected}")


class SVDLinear(LoRALayer, nn.Linear):
    """A dense layer with an AdaLoRA update: y = x·Wᵀ + b + scaling·dropout(x)·(A⊙E)ᵀ·Bᵀ.

    ``scaling = lora_alpha / (ranknum + 1e-5)`` (PEFT's formula; a
    ``lora_alpha`` <= 0 stands for r, as in PEFT), ``ranknum`` a buffer holding
    the initial rank. A and B start as N(0, 0.02²), E at zero, so the layer
    starts as the plain Linear. ``lora_A * lora_E`` is passed as the A of
    ``functional.lora_linear``, so A, E and B get their gradients from the
    fused backward through that product.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0., fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        _check_r(r)
        LF.check_dropout(lora_dropout)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_E = nn.Parameter(self.weight.new_zeros((r, 1)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self._alpha = float(lora_alpha) if lora_alpha > 0 else float(r)
            # The rank in the scaling: stays at the initial r when singular
            # values are pruned or the layer is resized (PEFT keeps it too).
            self.register_buffer("ranknum", self.weight.new_full((1,), float(r)))
            self._set_ranknum(float(r))
            self.weight.requires_grad = False
            # Runs after LoRALayer's pre-hook (which unmerges with the old
            # scaling) and before its post-hook (which merges with the new).
            self._register_load_state_dict_pre_hook(SVDLinear._load_ranknum_hook,
                                                    with_module=True)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def _init_lora(self) -> None:
        distributed.init_full_(self.lora_E, nn.init.zeros_)
        distributed.init_full_(self.lora_A, lambda t: nn.init.normal_(t, mean=0.0, std=0.02))
        distributed.init_full_(self.lora_B, lambda t: nn.init.normal_(t, mean=0.0, std=0.02))
        self.ranknum.fill_(float(self.r))  # a buffer: set again after to_empty
        self._set_ranknum(float(self.r))

    def _set_ranknum(self, ranknum: float) -> None:
        # A Python float, so forward neither syncs with the device nor breaks
        # a torch.compile graph to read the buffer.
        self.scaling = self._alpha / (ranknum + 1e-5)

    def set_ranknum(self, ranknum: float) -> None:
        """Set ``ranknum`` and the scaling. The buffer is read at construction
        and when a checkpoint loads: change it through this method."""
        def update():
            self.ranknum.fill_(float(ranknum))
            self._set_ranknum(float(ranknum))
        self._edit(update)

    @staticmethod
    def _load_ranknum_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs):
        value = state_dict.get(prefix + "ranknum")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            module._set_ranknum(float(value))

    def _merge_args(self):
        return self.weight.data, self.fan_in_fan_out, [True]

    def _lora_pair(self):
        """Merge and checkpoints use B·(A⊙E)."""
        return (self.lora_A * self.lora_E).detach(), self.lora_B.detach()

    def delta_weight(self) -> torch.Tensor:
        """scaling·B·(A⊙E) in W's layout (differentiable)."""
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling
        return delta.transpose(0, 1) if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor):
        if self._has_lora() and not self.merged:
            return LF.lora_linear(x, self.weight, self.bias, self.lora_A * self.lora_E,
                                  self.lora_B, self.scaling, self._dropout_p(), self.training,
                                  self.fan_in_fan_out)
        w = self.weight.transpose(0, 1) if self.fan_in_fan_out else self.weight
        return F.linear(x, w, bias=self.bias)

    # -- rank pattern -------------------------------------------------------
    def _edit(self, fn) -> None:
        """Run ``fn`` (which changes A, E or B) on the unmerged layer."""
        merged = self.merged and self._has_lora()
        if merged:
            self._apply_delta(-1)
        try:
            with torch.no_grad():
                fn()
        finally:
            if merged:
                self._apply_delta(+1)

    def mask_(self, keep) -> None:
        """Zero the E entries whose ``keep`` is False (a list of r bools or a tensor)."""
        keep = self._check_keep(keep)
        self._edit(lambda: self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0))

    def resize_(self, keep) -> None:
        """Keep only the triplets whose ``keep`` is True: A, E and B become
        new parameters of rank ``sum(keep)`` (an optimizer holding the old
        ones must be rebuilt). ``ranknum``, and so the scaling, do not change."""
        keep = self._check_keep(keep)

        def resize():
            idx = keep.nonzero().view(-1)
            self.lora_A = nn.Parameter(self.lora_A[idx].clone(),
                                       requires_grad=self.lora_A.requires_grad)
            self.lora_E = nn.Parameter(self.lora_E[idx].clone(),
                                       requires_grad=self.lora_E.requires_grad)
            self.lora_B = nn.Parameter(self.lora_B[:, idx].clone(),
                                       requires_grad=self.lora_B.requires_grad)

        merged = self.merged and self._has_lora()
        if merged:
            self._apply_delta(-1)
        with torch.no_grad():
            resize()
        # r = 0 keeps empty A, E, B (PEFT's shapes) and runs as a plain Linear.
        self.r = int(keep.sum())
        if merged and self._has_lora():
            self._apply_delta(+1)

    def _check_keep(self, keep, name: str = "keep") -> torch.Tensor:
        if not hasattr(self, "lora_A"):
            raise ValueError(f"{name}: this SVDLinear has r=0, there is nothing to mask")
        keep = torch.as_tensor(keep, device=self.lora_E.device).view(-1)
        if keep.dtype != torch.bool or keep.numel() != self.lora_E.shape[0]:
            raise ValueError(f"{name}: got {keep.numel()} values of {keep.dtype}, expected "
                             f"{self.lora_E.shape[0]} bools (one per singular value)")
        return keep


# -- model-level helpers -------------------------------------------------------
def svd_layers(model: nn.Module) -> Dict[str, SVDLinear]:
    """The model's SVDLinear layers that hold a LoRA update, by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, SVDLinear) and hasattr(m, "lora_A")}


def _pattern_key(module_name: str) -> str:
    return f"{module_name}.lora_E" if module_name else "lora_E"


def _module_name(key: str) -> str:
    # "<layer>.lora_E", also with PEFT's adapter suffix ("<layer>.lora_E.default").
    if "lora_E" not in key:
        _fail("rank_pattern key", key, "'<layer name>.lora_E'")
    return key[:key.rindex("lora_E")].rstrip(".")


def _pattern_layers(model: nn.Module, rank_pattern: RankPattern):
    if not isinstance(rank_pattern, dict) or not rank_pattern:
        _fail("rank_pattern", type(rank_pattern).__name__,
              "a non-empty dict '<layer>.lora_E' -> list of bools")
    layers = svd_layers(model)
    out = []
    for key, keep in rank_pattern.items():
        name = _module_name(key)
        if name not in layers:
            _fail("rank_pattern key", key, f"one of {sorted(map(_pattern_key, layers))}")
        out.append((layers[name], key, keep))
    return out


def mask_using_rank_pattern(model: nn.Module, rank_pattern: RankPattern) -> None:
    """Zero the E entries that ``rank_pattern`` drops (layers keep their shapes)."""
    for layer, key, keep in _pattern_layers(model, rank_pattern):
        layer.mask_(layer._check_keep(keep, f"rank_pattern[{key!r}]"))


def resize_by_rank_pattern(model: nn.Module, rank_pattern: RankPattern) -> None:
    """Drop the triplets that ``rank_pattern`` drops from each layer's A, E and
    B (PEFT's ``resize_modules_by_rank_pattern``): the layer's output is that
    of the masked layer, and a checkpoint saved after resizing loads into it."""
    for layer, key, keep in _pattern_layers(model, rank_pattern):
        layer.resize_(layer._check_keep(keep, f"rank_pattern[{key!r}]"))


def orthogonal_regularization(model: nn.Module, orth_reg_weight: float = 1.0) -> torch.Tensor:
    """``orth_reg_weight`` times the mean over the SVDLinear layers' A and B of
    ‖A·Aᵀ − I‖_F and ‖Bᵀ·B − I‖_F: PEFT's regulariser (the Frobenius norm,
    not its square, averaged over the matrices)."""
    reg, count = None, 0
    for layer in svd_layers(model).values():
        for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            term = torch.norm(cov - eye, p="fro")
            reg = term if reg is None else reg + term
            count += 1
    if reg is None:
        return torch.zeros(())
    return orth_reg_weight * (reg / count)


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(name, value, f"an integer >= {lo}")
    return value


class RankAllocator:
    """AdaLoRA's budget schedule and singular-value pruning (PEFT's numerics).

    Arguments are AdaLoraConfig's: ``target_r`` (target mean rank per layer),
    ``init_r`` (every layer's initial rank; None takes the layers' ranks),
    ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
    ``orth_reg_weight``, ``total_step`` (required) and ``rank_pattern`` (a
    pattern from an earlier run, re-applied in the final phase). Call
    ``update_and_allocate(model, global_step)`` once per optimizer step,
    after ``optimizer.step()`` and before ``optimizer.zero_grad()``.
    """

    def __init__(self, model: nn.Module, *, target_r: int = 8, init_r: Optional[int] = None,
                 tinit: int = 0, tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85,
                 beta2: float = 0.85, orth_reg_weight: float = 0.5,
                 total_step: Optional[int] = None, rank_pattern: Optional[RankPattern] = None):
        if total_step is None:
            _fail("total_step", None, "an integer > 0 (the number of optimizer steps)")
        self.total_step = _check_int("total_step", total_step, 1)
        self.target_r = _check_int("target_r", target_r, 0)
        self.tinit = _check_int("tinit", tinit, 0)
        self.tfinal = _check_int("tfinal", tfinal, 0)
        self.deltaT = _check_int("deltaT", deltaT, 1)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not isinstance(beta, (int, float)) or isinstance(beta, bool) \
                    or not 0.0 < beta < 1.0:
                _fail(name, beta, "a float in (0, 1)")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        if not isinstance(orth_reg_weight, (int, float)) or not orth_reg_weight >= 0:
            _fail("orth_reg_weight", orth_reg_weight, "a float >= 0")
        self.orth_reg_weight = float(orth_reg_weight)
        if self.tinit >= self.total_step - self.tfinal:
            _fail("tinit", self.tinit, f"< total_step - tfinal = {self.total_step} - "
                  f"{self.tfinal} = {self.total_step - self.tfinal} (no steps are left for "
                  "the budget decrease: lower tinit or tfinal, or raise total_step)")

        layers = svd_layers(model)
        if not layers:
            _fail("model", type(model).__name__, "a model with SVDLinear layers of r > 0")
        if init_r is not None:
            _check_int("init_r", init_r, 1)
            for name, layer in layers.items():
                if layer.r != init_r:
                    _fail("init_r", init_r, f"the rank of every SVDLinear layer ({name!r} "
                          f"has r={layer.r}); pass init_r=None to take the layers' ranks")
        self.names = sorted(layers)
        self.init_bgt = sum(layer.lora_E.shape[0] for layer in layers.values())
        self.init_r = init_r if init_r is not None else self.init_bgt / len(layers)
        self.target_bgt = self.target_r * len(layers)
        if self.target_bgt > self.init_bgt:
            _fail("target_r", self.target_r, f"at most init_r={self.init_r:g} "
                  "(the mean initial rank)")
        if rank_pattern is not None:
            for layer, key, keep in _pattern_layers(model, rank_pattern):
                layer._check_keep(keep, f"rank_pattern[{key!r}]")
            rank_pattern = {k: list(map(bool, v)) for k, v in rank_pattern.items()}
        self.rank_pattern: Optional[RankPattern] = rank_pattern
        self.budget = self.init_bgt
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_unc: Dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        """(budget at ``step``, whether ``step`` reallocates)."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.deltaT == 0

    def _lora_params(self, model):
        for name, layer in svd_layers(model).items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                yield f"{name}.{kind}" if name else kind, getattr(layer, kind)

    def update_ipt(self, model: nn.Module) -> None:
        """Fold |p·∂L/∂p| of every A, E and B entry into the sensitivity and
        uncertainty averages."""
        with torch.no_grad():
            for n, p in self._lora_params(model):
                grad = p.grad
                if grad is None and p.numel() == 0:   # a layer resized to rank 0
                    grad = torch.zeros_like(p)
                if grad is None:
                    raise RuntimeError(
                        f"{n} has no gradient: call update_and_allocate after backward() "
                        "and before optimizer.zero_grad()")
                if n not in self.ipt:
                    self.ipt[n] = torch.zeros_like(p)
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                self.ipt[n] = (p * grad).abs().detach()
                self.exp_avg_ipt[n] = (self.beta1 * self.exp_avg_ipt[n]
                                       + (1 - self.beta1) * self.ipt[n])
                unc = (self.ipt[n] - self.exp_avg_ipt[n]).abs()
                self.exp_avg_unc[n] = self.beta2 * self.exp_avg_unc[n] + (1 - self.beta2) * unc

    def _score(self, n: str) -> torch.Tensor:
        if n not in self.exp_avg_ipt:
            raise RuntimeError(f"{n} has no importance score yet: update_and_allocate "
                               "accumulates them on the steps before total_step - tfinal")
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def triplet_scores(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """Importance of each (A row, E entry, B column), by rank-pattern key."""
        out = {}
        for name in svd_layers(model):
            prefix = f"{name}." if name else ""
            ipt_a = self._score(prefix + "lora_A").mean(dim=1, keepdim=True)
            ipt_b = self._score(prefix + "lora_B").mean(dim=0, keepdim=False).view(-1, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            out[_pattern_key(name)] = self._score(prefix + "lora_E").view(-1) + ipt_ab.view(-1)
        return out

    def mask_to_budget(self, model: nn.Module, budget: int) -> RankPattern:
        """Zero the E entries of the ``init_bgt - budget`` least important
        triplets over the model (ties at the threshold are dropped too)."""
        scores = self.triplet_scores(model)
        k = self.init_bgt - budget
        if k > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        else:
            threshold = -math.inf
        pattern = {}
        layers = svd_layers(model)
        for key, score in scores.items():
            keep = ~(score <= threshold)
            layers[_module_name(key)].mask_(keep)
            pattern[key] = keep.tolist()
        return pattern

    def mask_using_rank_pattern(self, model: nn.Module,
                                rank_pattern: Optional[RankPattern] = None) -> None:
        """Zero the E entries that ``rank_pattern`` (default: the allocator's) drops."""
        pattern = self.rank_pattern if rank_pattern is None else rank_pattern
        if pattern is None:
            raise ValueError("rank_pattern: got None, expected a rank pattern (pass one, or "
                             "run update_and_allocate up to total_step - tfinal first)")
        mask_using_rank_pattern(model, pattern)

    def update_and_allocate(self, model: nn.Module, global_step: int
                            ) -> Tuple[int, Optional[RankPattern]]:
        """One step of AdaLoRA (module docstring): returns the budget and the
        rank pattern applied at this step (None when nothing was masked)."""
        end = self.total_step - self.tfinal
        if global_step < end:
            self.update_ipt(model)
            budget, mask_now = self.budget_schedule(global_step)
            pattern = self.mask_to_budget(model, budget) if mask_now else None
            if pattern:
                self.rank_pattern = pattern
        elif global_step == end:
            budget, _ = self.budget_schedule(global_step)
            pattern = self.rank_pattern = self.mask_to_budget(model, budget)
            self.reset_ipt()
        else:
            budget, pattern = self.target_bgt, self.rank_pattern
            self.mask_using_rank_pattern(model)
        self.budget = budget
        return budget, pattern

    def orthogonal_regularization(self, model: nn.Module) -> torch.Tensor:
        """``orth_reg_weight`` × PEFT's orthogonality penalty on A and B (add it to the loss)."""
        return orthogonal_regularization(model, self.orth_reg_weight)

    def register_orthogonal_regularization(self, model: nn.Module):
        """Add the penalty to the ``loss`` of ``model``'s output (a dict or an
        object with a ``loss`` tensor) on every forward, as PEFT's AdaLoraModel
        does. Returns the hook's handle (``.remove()`` undoes it)."""

        def hook(module, args, output):
            if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
                output["loss"] = output["loss"] + self.orthogonal_regularization(module)
            elif isinstance(getattr(output, "loss", None), torch.Tensor):
                output.loss = output.loss + self.orthogonal_regularization(module)
            return output

        return model.register_forward_hook(hook)


_CALLBACK = None


def _callback_class():
    global _CALLBACK
    if _CALLBACK is None:
        from transformers import TrainerCallback

        class AdaLoraCallback(TrainerCallback):
            """Calls ``allocator.update_and_allocate(model, state.global_step)`` in
            ``on_optimizer_step``: the Trainer runs it after ``optimizer.step()``
            and before ``model.zero_grad()``, so the gradients are still there
            (``on_step_end`` comes after ``zero_grad``). ``history`` holds
            (global_step, budget) per optimizer step."""

            def __init__(self, allocator: RankAllocator):
                self.allocator = allocator
                self.history: List[Tuple[int, int]] = []

            def on_optimizer_step(self, args, state, control, model=None, **kwargs):
                budget, _ = self.allocator.update_and_allocate(model, state.global_step)
                self.history.append((state.global_step, budget))

        AdaLoraCallback.__module__ = __name__
        _CALLBACK = AdaLoraCallback
    return _CALLBACK


def __getattr__(name: str):
    # The callback subclasses transformers.TrainerCallback: transformers is
    # imported on first use only.
    if name == "AdaLoraCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# AdaLoraCallback is left out: a star import must not import transformers.
__all__ = ["SVDLinear", "RankAllocator", "svd_layers", "mask_using_rank_pattern",
           "resize_by_rank_pattern", "orthogonal_regularization"]
