"""loralib-compatible LoRA layers running on the fused ``lora_kernels`` ops.

Names, constructor signatures and defaults, parameter names and shapes, and the
order in which parameters are drawn from the RNG follow loralib 0.1.2, so
``import lora_kernels as lora`` replaces ``import loralib as lora`` and the
same seed gives bit-identical layers. Where loralib is wrong we are right
instead (README, "Where we differ from loralib"):

* Conv1d/Conv3d with kernel_size > 1 and tuple kernel sizes get LoRA shapes
  that fit the conv weight (Conv2d keeps loralib's shapes);
* MergedLinear with r > 0 and every group disabled runs as a plain Linear;
* dropout is a module (no lambda), so layers pickle and deepcopy;
* ConvLoRA applies its ``lora_dropout`` (loralib ignores it);
* a checkpoint holds the unmerged weight whatever the train/eval mode, and
  loading into a merged layer re-merges with the loaded A and B;
* a checkpoint with a wrong-shaped key for a layer changes none of that
  layer's tensors.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from . import functional as LF
from . import reference


def _check_r(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r: got {r!r}, expected an integer >= 0")
    return r


class LoRALayer:
    """Mixin holding LoRA's hyper-parameters and the merge/unmerge protocol."""

    def __init__(self, r: int, lora_alpha: int, lora_dropout: float, merge_weights: bool):
        self.r = _check_r(r)
        self.lora_alpha = lora_alpha
        p = LF.check_dropout(lora_dropout)
        # A module, not loralib's lambda, so layers pickle and deepcopy.
        self.lora_dropout = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self._register_state_dict_hook(LoRALayer._save_unmerged_hook)
        self._register_load_state_dict_pre_hook(LoRALayer._load_pre_hook, with_module=True)
        self.register_load_state_dict_post_hook(LoRALayer._load_post_hook)

    # -- per-class pieces -------------------------------------------------
    def _has_lora(self) -> bool:
        return self.r > 0 and hasattr(self, "lora_A")

    def _weight_name(self) -> str:
        return "weight"

    def _merge_args(self):
        """(W to merge into, fan_in_fan_out, enable_lora); a conv's W keeps its
        shape (``functional.merge_`` views it as B's rows × A's columns)."""
        raise NotImplementedError

    def _lora_pair(self):
        """(A, B) whose B·A is merged into W (detached)."""
        return self.lora_A.detach(), self.lora_B.detach()

    def reset_lora_parameters(self) -> None:
        """Initialise the LoRA tensors as the constructor does, leaving W and
        the bias alone: for meta-device construction, where a model is built
        on ``torch.device("meta")``, sharded, ``to_empty``'d, loaded with its
        pretrained weights, and then given fresh adapters. DTensor (FSDP2)
        parameters are drawn whole on every rank and each rank keeps its
        block, so the same seed gives the single-process values."""
        if hasattr(self, "lora_A"):
            with torch.no_grad():
                self._init_lora()

    def _init_lora(self) -> None:
        """loralib's initialisation of A and B (Linear, MergedLinear, conv)."""
        distributed.init_full_(self.lora_A, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        distributed.init_full_(self.lora_B, nn.init.zeros_)

    def _dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    # -- merge protocol ---------------------------------------------------
    def _apply_delta(self, sign: int) -> None:
        distributed.reshard_for_update(self)  # FSDP2: merge into the shards
        w, fan_in_fan_out, enable_lora = self._merge_args()
        fn = LF.merge_ if sign > 0 else LF.unmerge_
        with torch.no_grad():
            fn(w, *self._lora_pair(), self.scaling, fan_in_fan_out, enable_lora)

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        if mode:
            if self.merge_weights and self.merged:
                if self._has_lora():
                    self._apply_delta(-1)
                self.merged = False
        else:
            if self.merge_weights and not self.merged:
                if self._has_lora():
                    self._apply_delta(+1)
                self.merged = True
        return self

    # -- checkpoints --------------------------------------------------------
    @staticmethod
    def _save_unmerged_hook(module, destination, prefix, local_metadata):
        # Checkpoints hold W without ΔW whatever the mode (loralib saves the
        # merged W in eval mode, which a train-mode model then counts twice).
        key = prefix + module._weight_name()
        if module.merged and module._has_lora() and key in destination:
            w = destination[key].detach().clone()
            with torch.no_grad():
                module._unmerge_copy(w)
            destination[key] = w
        return destination

    def _unmerge_copy(self, w: torch.Tensor) -> None:
        """In place: a copy ``w`` of the merged W back to W alone."""
        _, fan_in_fan_out, enable_lora = self._merge_args()
        LF.unmerge_(w, *self._lora_pair(), self.scaling, fan_in_fan_out, enable_lora)

    @staticmethod
    def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs):
        own = dict(module.named_parameters(recurse=True))
        own.update(dict(module.named_buffers(recurse=True)))
        bad = []
        for name, tensor in own.items():
            key = prefix + name
            if key in state_dict and isinstance(state_dict[key], torch.Tensor) \
                    and state_dict[key].shape != tensor.shape:
                bad.append(f"{key}: checkpoint shape {tuple(state_dict[key].shape)}, "
                           f"expected {tuple(tensor.shape)}")
        if bad:
            # Load none of this layer's tensors rather than some of them.
            for name in own:
                state_dict.pop(prefix + name, None)
            error_msgs.append(f"size mismatch in LoRA layer '{prefix[:-1]}' "
                              f"(none of its tensors were loaded): " + "; ".join(bad))
            module._remerge_after_load = False
            return
        # A merged layer goes back to W alone before loading, and is merged
        # again with whatever A and B it ends up with.
        module._remerge_after_load = module.merged and module._has_lora()
        if module._remerge_after_load:
            module._apply_delta(-1)

    @staticmethod
    def _load_post_hook(module, incompatible_keys):
        if getattr(module, "_remerge_after_load", False):
            module._remerge_after_load = False
            module._apply_delta(+1)


class Embedding(LoRALayer, nn.Embedding):
    """LoRA in an embedding: A (r, num_embeddings) starts at zero, B (dim, r) ~ N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0,
                 lora_alpha: int = 1, merge_weights: bool = True, **kwargs):
        _check_r(r)
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0,
                           merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        self.reset_lora_parameters()

    def _init_lora(self) -> None:
        distributed.init_full_(self.lora_A, nn.init.zeros_)
        distributed.init_full_(self.lora_B, nn.init.normal_)

    def _merge_args(self):
        # W is (num_embeddings, dim) = ΔWᵀ's layout: the fan_in_fan_out form.
        return self.weight.data, True, [True]

    def forward(self, x: torch.Tensor):
        if self.r > 0 and not self.merged:
            if self.max_norm is None and not self.scale_grad_by_freq and not self.sparse:
                return LF.lora_embedding(x, self.weight, self.lora_A, self.lora_B,
                                         self.scaling, self.padding_idx)
            # Options the fused op does not take: loralib's composition.
            result = nn.Embedding.forward(self, x)
            after_a = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx,
                                  self.max_norm, self.norm_type, self.scale_grad_by_freq,
                                  self.sparse)
            return result + (after_a @ self.lora_B.transpose(0, 1)) * self.scaling
        return nn.Embedding.forward(self, x)


class Linear(LoRALayer, nn.Linear):
    """LoRA in a dense layer: y = x·Wᵀ + b + (α/r)·dropout(x)·Aᵀ·Bᵀ."""

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
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            # (in, out), stored contiguous: loralib keeps a transposed view,
            # which FSDP2 refuses to shard (the values are the same).
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def _merge_args(self):
        return self.weight.data, self.fan_in_fan_out, [True]

    def forward(self, x: torch.Tensor):
        if self.r > 0 and not self.merged:
            return LF.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                  self.scaling, self._dropout_p(), self.training,
                                  self.fan_in_fan_out)
        w = self.weight.transpose(0, 1) if self.fan_in_fan_out else self.weight
        return F.linear(x, w, bias=self.bias)


class MergedLinear(LoRALayer, nn.Linear):
    """One dense layer holding several outputs (e.g. q, k, v), LoRA on some of them.

    ``enable_lora`` splits the output features into equal groups; each enabled
    group gets its own rank-r A and B (stacked in ``lora_A``/``lora_B``).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0., enable_lora: List[bool] = [False],
                 fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs):
        _check_r(r)
        LF.check_dropout(lora_dropout)
        if len(enable_lora) == 0 or out_features % len(enable_lora) != 0:
            raise ValueError(f"enable_lora: got {len(enable_lora)} groups, expected a number "
                             f"of groups that divides out_features={out_features}")
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * sum(enable_lora), in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros(
                (out_features // len(enable_lora) * sum(enable_lora), r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            # Follows .to()/.cuda() but stays out of checkpoints, as in loralib.
            self.register_buffer("lora_ind", self.weight.new_zeros((out_features,),
                                                                   dtype=torch.bool),
                                 persistent=False)
        self.reset_parameters()
        if fan_in_fan_out:
            # (in, out), stored contiguous: loralib keeps a transposed view,
            # which FSDP2 refuses to shard (the values are the same).
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def _init_lora(self) -> None:
        LoRALayer._init_lora(self)
        # Which output features have an update (a buffer: to_empty leaves it
        # uninitialised after meta-device construction, so it is set here).
        ind = self.lora_ind.view(len(self.enable_lora), -1)
        ind.fill_(False)
        ind[list(map(bool, self.enable_lora)), :] = True

    def zero_pad(self, x):
        result = x.new_zeros((len(self.lora_ind), *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def merge_AB(self):
        """ΔW = B·A for the enabled groups, zero elsewhere, in W's layout."""
        delta = reference.delta_weight(self.lora_A, self.lora_B, len(self.enable_lora),
                                       LF.enabled_groups(self.enable_lora), self.out_features)
        return delta.transpose(0, 1) if self.fan_in_fan_out else delta

    def _merge_args(self):
        return self.weight.data, self.fan_in_fan_out, list(self.enable_lora)

    def forward(self, x: torch.Tensor):
        if self._has_lora() and not self.merged:
            return LF.lora_grouped_linear(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                          self.scaling, self.enable_lora, self._dropout_p(),
                                          self.training, self.fan_in_fan_out)
        w = self.weight.transpose(0, 1) if self.fan_in_fan_out else self.weight
        return F.linear(x, w, bias=self.bias)


def _kernel_tuple(kernel_size, dims: int):
    if isinstance(kernel_size, int):
        return (kernel_size,) * dims
    k = tuple(kernel_size)
    if len(k) != dims or not all(isinstance(v, int) and v > 0 for v in k):
        raise ValueError(f"kernel_size: got {kernel_size!r}, expected an int or a tuple of "
                         f"{dims} positive ints")
    return k


class ConvLoRA(LoRALayer, nn.Module):
    """LoRA on a convolution ``conv_module`` (kept as ``self.conv``).

    ΔW = B·A reshaped to the conv weight, with A (r·k₁, in·k₁) and
    B (out/groups·k₂⋯k_d, r·k₁) for kernel (k₁, …, k_d): loralib's shapes for
    Conv2d with a square kernel, and shapes that fit Conv1d, Conv3d and
    rectangular kernels, where loralib's do not.
    """

    _DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}

    def __init__(self, conv_module, in_channels, out_channels, kernel_size, r=0, lora_alpha=1,
                 lora_dropout=0., merge_weights=True, **kwargs):
        _check_r(r)
        LF.check_dropout(lora_dropout)
        dims = self._DIMS.get(conv_module, 2)
        k = _kernel_tuple(kernel_size, dims)
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * k[0], in_channels * k[0])))
            self.lora_B = nn.Parameter(self.conv.weight.new_zeros(
                (out_channels // self.conv.groups * math.prod(k[1:]), r * k[0])))
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()
        self.merged = False

    def reset_parameters(self):
        self.conv.reset_parameters()
        self.reset_lora_parameters()

    def _weight_name(self) -> str:
        return "conv.weight"

    def _merge_args(self):
        return self.conv.weight.data, False, [True]

    def forward(self, x):
        if self.r > 0 and not self.merged:
            p = self._dropout_p() if self.training else 0.0
            if p == 0.0:
                w = LF.merged_weight(self.conv.weight, self.lora_A, self.lora_B, self.scaling)
                return self.conv._conv_forward(x, w, self.conv.bias)
            # Dropout on the branch input: conv(x, W) + conv(dropout(x), ΔW).
            delta = LF.merged_weight(torch.zeros_like(self.conv.weight), self.lora_A,
                                     self.lora_B, self.scaling)
            return (self.conv._conv_forward(x, self.conv.weight, self.conv.bias)
                    + self.conv._conv_forward(LF.dropout(x, p), delta, None))
        return self.conv(x)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
