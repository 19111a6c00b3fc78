"""``DoraLinear``: DoRA (weight-decomposed LoRA, Liu et al. 2024) in a dense layer.

    y = m ⊙ (x·(W + s·B·A)ᵀ) / ‖W + s·B·A‖ + b        (dropout off)

with ``m = lora_magnitude_vector`` (out,) learned and the row norm of
W + s·B·A detached (PEFT's ``use_dora=True``; with dropout on, PEFT's form, see
``lora_kernels.functional.dora_linear``). Parameter names, shapes and
initialisation are PEFT's (``lora_magnitude_vector`` starts at ‖W‖'s rows, so
the model's outputs are unchanged at first), and loralib's for the rest, as in
:class:`~lora_kernels.layers.Linear`; ``inject(..., use_dora=True)`` builds it.

Merging (``model.eval()`` with ``merge_weights``, ``merge_and_unload``) is in
place with no W-sized temporary: ``W += s·B·A`` (the merge op) and then each
row scaled by m / ‖W + s·B·A‖, the norm taken from the unmerged W and kept
until the unmerge, which undoes both steps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from . import functional as LF
from .layers import Linear


class DoraLinear(Linear):
    """DoRA in a dense layer: ``Linear``'s arguments; r must be positive."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0., fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        if isinstance(r, int) and not isinstance(r, bool) and r == 0:
            raise ValueError("r: got 0, expected r > 0 (DoRA needs a low-rank update)")
        super().__init__(in_features, out_features, r=r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, fan_in_fan_out=fan_in_fan_out,
                         merge_weights=merge_weights, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(self.weight.new_empty(out_features))
        self._merged_norm = None
        with torch.no_grad():
            self._init_magnitude()

    def _init_magnitude(self) -> None:
        """m = ‖W + s·B·A‖ per row (PEFT's start: the layer computes W·x)."""
        if hasattr(self, "lora_magnitude_vector"):
            distributed.copy_full_(self.lora_magnitude_vector, self.weight_norm().to(
                self.lora_magnitude_vector.dtype))

    def _init_lora(self) -> None:
        Linear._init_lora(self)
        self._init_magnitude()

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖ per output row of the unmerged W (detached, float32)."""
        w = distributed.full(self.weight.detach())
        return LF.dora_weight_norm(w, distributed.full(self.lora_A.detach()),
                                   distributed.full(self.lora_B.detach()), self.scaling,
                                   self.fan_in_fan_out)

    def _row_scale(self, norm: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·B·A‖ shaped to scale W's rows in W's layout."""
        magnitude = distributed.full(self.lora_magnitude_vector.detach())
        m = magnitude / norm.to(magnitude.dtype)
        m = m.to(self.weight.dtype)
        return m[None, :] if self.fan_in_fan_out else m[:, None]

    def _apply_delta(self, sign: int) -> None:
        distributed.reshard_for_update(self)  # FSDP2: merge into the shards
        w = self.weight.detach()  # not .data: W's version counter must see the change
        with torch.no_grad():
            if sign > 0:
                self._merged_norm = self.weight_norm()
                LF.merge_(w, *self._lora_pair(), self.scaling, self.fan_in_fan_out)
                self._scale_rows_(w, self._row_scale(self._merged_norm))
            else:
                self._unmerge_copy(w)
                self._merged_norm = None

    @staticmethod
    def _scale_rows_(w: torch.Tensor, scale: torch.Tensor) -> None:
        """W ⊙= scale in place; a sharded (DTensor) W scales its own block."""
        local, offset = distributed.local_block(w)
        local.mul_(scale[tuple(slice(o, o + n) if k > 1 else slice(None)
                               for o, n, k in zip(offset, local.shape, scale.shape))])

    def _unmerge_copy(self, w: torch.Tensor) -> None:
        """In place: merged W (or a copy of it) back to W alone, with the norm
        kept at the merge."""
        self._scale_rows_(w, 1.0 / self._row_scale(self._merged_norm))
        LF.unmerge_(w, *self._lora_pair(), self.scaling, self.fan_in_fan_out)

    def forward(self, x: torch.Tensor):
        if not self.merged:
            return LF.dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                  self.lora_magnitude_vector, self.scaling, self._dropout_p(),
                                  self.training, self.fan_in_fan_out)
        w = self.weight.transpose(0, 1) if self.fan_in_fan_out else self.weight
        return F.linear(x, w, bias=self.bias)
