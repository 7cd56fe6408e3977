"""The LoRA layer: a frozen base layer plus a trainable low-rank update.

    y = base(x) + up(down(dropout(x))) * scale,    scale = alpha / rank   (Hu et al. 2021, "LoRA")

`down` (A, rank x in) starts Kaiming-uniform and `up` (B, out x rank) starts at zero, so the
output is unchanged at initialisation (the paper's Section 4.1; peft and kohya do the same).
rsLoRA (Kalajdzievski 2023) uses scale = alpha / sqrt(rank). DoRA (Liu et al. 2024) splits the
weight into a magnitude per output channel and a direction: W' = m * (W + scale BA) / ||W + scale BA||;
LyCORIS can also put the magnitude on the input axis (`dora_axis="in"`, its `wd_on_output=False`),
one per input channel with the norm taken over everything else.

The runtime strength `multiplier` s means what ComfyUI and A1111 make a LoRA file's strength mean:
the weight moves from the base (s = 0) to the adapted weight (s = 1) in a straight line,
W + s (W' - W). For plain LoRA that is W + s scale BA; for DoRA the magnitude is included, so a
DoRA at strength 0.001 is within 0.1% of the base model. Training uses s = 1.

The layers it wraps (`supported`): nn.Linear; nn.Conv1d and nn.Conv2d, where `down` is a conv with
the base's kernel, stride, padding, dilation and padding mode and `up` a 1x1 conv (LoCon); and
transformers' `Conv1D` (GPT-2's attention and MLP), a Linear that stores its weight as (in, out) and
computes x @ W (peft's `fan_in_fan_out`): the adapter is the same, only the weight's layout differs.
Every other type (nn.Embedding, norms, grouped convs) is refused by name where it is targeted.

A base stored in float8 (a quantised model, e.g. minsdxl.fp8) holds a scaled, rounded copy of its
weight and computes with it in its own forward: adapters on it default to fp32, and what needs the
weight itself (merging, DoRA) is refused rather than computed wrong. On a bf16/fp16 base the adapter
is fp32 too (peft's default: bf16 masters lose updates below bf16's resolution); `dtype=` overrides.

The wrapper keeps the module's interface: `layer.weight` is the weight the layer computes with (the
base weight plus the update at its strength, differentiable), so owners that read their child's
weight instead of calling it (nn.MultiheadAttention's out_proj, a ViT's patch embedding, tied
embeddings) get the right answer; `layer.bias` and every other attribute (in_features, kernel_size)
are the base's, and assigning `layer.weight = p` (transformers tying lm_head to the embeddings)
sets the base's.

Several adapters stack: the base of a LoRALayer may itself be a LoRALayer (each with its own `name`),
y = base(x) + this adapter's update, so each can be scaled, disabled or removed alone.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LoRAError

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
HALF = (torch.bfloat16, torch.float16)


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out). Looked up without
    importing transformers: if it was never imported, no such layer can exist."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def supported(module: nn.Module) -> bool:
    """Whether a LoRALayer can wrap `module` (grouped convs are refused separately, by the layer)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_fan_in_fan_out(module)


def innermost(module: nn.Module) -> nn.Module:
    """The layer under a stack of LoRALayers."""
    while isinstance(module, LoRALayer):
        module = module.base
    return module


def logical_shape(base: nn.Module) -> tuple:
    """The base weight's shape as (out, in[, k...]), whatever its storage layout (Conv1D stores (in, out))."""
    shape = tuple(base.weight.shape)
    return shape[::-1] if is_fan_in_fan_out(base) else shape


def adapter_shapes(base: nn.Module, rank: int) -> tuple[tuple, tuple]:
    """(down, up) weight shapes of a rank-`rank` adapter on `base`: (r, in[, k...]), (out, r[, 1...])."""
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank) + (1,) * len(base.kernel_size)
    out_features, in_features = logical_shape(base)
    return (rank, in_features), (out_features, rank)


class _Uninitialised:
    """An adapter factor whose values LoRALayer.reset_parameters sets: the layer's own random init
    would run twice on a device and costs a dispatch per layer on meta (a third of injecting SDXL)."""

    def reset_parameters(self) -> None:
        pass

    def _get_name(self) -> str:  # printed as the layer it is: Linear, Conv2d
        return type(self).__name__.lstrip("_")


class _Linear(_Uninitialised, nn.Linear):
    pass


class _Conv1d(_Uninitialised, nn.Conv1d):
    pass


class _Conv2d(_Uninitialised, nn.Conv2d):
    pass


def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (the meta device has no autocast)."""
    return torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)


class LoRALayer(nn.Module):
    """Wraps a supported layer (or another LoRALayer); only `lora_down`, `lora_up` (and DoRA's `magnitude`) train."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool = False, init: str = "kaiming",
                 rslora: bool = False, dtype: torch.dtype | None = None, dora_axis: str = "out", name: str = "default"):
        super().__init__()
        layer = innermost(base)
        if not supported(layer):
            raise LoRAError(f"LoRA wraps nn.Linear, nn.Conv1d, nn.Conv2d and transformers' Conv1D, "
                            f"not {type(layer).__name__}")
        if getattr(layer, "groups", 1) != 1:
            raise LoRAError(f"LoRA on grouped convolutions ({type(layer).__name__} with groups={layer.groups}) "
                            f"is not supported")
        if dora_axis not in ("out", "in"):
            raise LoRAError(f"dora_axis must be 'out' or 'in', not '{dora_axis}'")
        if rank < 1:
            raise LoRAError(f"rank must be at least 1, got {rank}")
        self.base, self.name = base, name
        self.is_conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
        self.fan_in_fan_out = is_fan_in_fan_out(layer)  # weight stored (in, out): transposed below
        self.rank, self.alpha, self.rslora = rank, float(rank if alpha is None else alpha), rslora
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.multiplier = 1.0  # runtime strength, e.g. 0.8 when sampling; not part of training
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # on the adapter's input only
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.merged = False
        self._original_weight = None  # the base weight merge replaced, put back bitwise by unmerge
        stored = layer.weight.dtype
        if dora and stored in FLOAT8:
            raise LoRAError(f"DoRA reads its base weight, which is stored in {stored} here ({layer}): use plain LoRA")
        dtype = dtype or (torch.float32 if stored in FLOAT8 + HALF else stored)
        factory = dict(device=layer.weight.device, dtype=dtype)  # next to the base weight
        if self.is_conv:
            conv = _Conv1d if isinstance(layer, nn.Conv1d) else _Conv2d
            self.lora_down = conv(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                  layer.dilation, bias=False, padding_mode=layer.padding_mode, **factory)
            self.lora_up = conv(rank, layer.out_channels, 1, bias=False, **factory)
        else:
            (_, in_features), (out_features, _) = adapter_shapes(layer, rank)
            self.lora_down = _Linear(in_features, rank, bias=False, **factory)
            self.lora_up = _Linear(rank, out_features, bias=False, **factory)
        self.dora_axis = dora_axis
        self.magnitude = None
        if dora:  # m starts as the norm of W along the axis, so W' = W at initialisation
            self.magnitude = nn.Parameter(self._weight_norm(self.base.weight.detach().to(dtype)))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        """The initial adapter: down random, up zero (so the output is the base's); DoRA's magnitude
        the base weight's norms. Call it again (lora.init_adapters) after materialising a model built
        on the meta device, once the base weights are loaded."""
        if init not in ("kaiming", "gaussian"):
            raise LoRAError(f"init must be 'kaiming' or 'gaussian', not '{init}'")
        if self.lora_down.weight.is_meta:
            return
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # nn.Linear's own default init
        else:
            nn.init.normal_(self.lora_down.weight, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_up.weight)
        if self.magnitude is not None:
            self.magnitude.copy_(self._weight_norm(self.base.weight.detach().to(self.magnitude.dtype)))

    # The module's own interface, for owners that read it instead of calling it.
    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with: the base weight, plus the update at its strength."""
        w = self.base.weight
        if self.merged or self.multiplier == 0.0 or w.dtype in FLOAT8:
            return w
        if self.magnitude is None:
            return w + (self.delta_weight() * self.multiplier).to(w.dtype)
        return w + ((self._adapted(w.to(self.lora_down.weight.dtype)) - w) * self.multiplier).to(w.dtype)

    @property
    def bias(self):
        return self.base.bias

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias") and "base" in self._modules:
            setattr(self.base, name, value)  # e.g. transformers tying lm_head.weight to the embeddings
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "lora_down", "lora_up") or name.startswith("_"):
                raise
            return getattr(self.base, name)  # in_features, kernel_size, padding_mode...: the base's

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The wrapped model's keys put the base's tensors under `base.`; a state dict of the model
        # without adapters (`<path>.weight`) loads into the base, e.g. after `to_empty()` on meta.
        for key in ("weight", "bias"):
            if prefix + key in state_dict and prefix + "base." + key not in state_dict:
                state_dict[prefix + "base." + key] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in the base weight's shape and layout: (out, in[, k...]), (in, out) for Conv1D."""
        up, down = self.lora_up.weight, self.lora_down.weight
        # (out, r) @ (r, in * k...): a 1x1 up after a k... down is one matmul
        delta = (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:]) * self.scale
        return delta.T if self.fan_in_fan_out else delta

    def _axis(self, which: str) -> int:
        """The dimension of the base weight that holds the output ('out') or input ('in') channels."""
        return int(which == "out") if self.fan_in_fan_out else int(which == "in")

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """L2 norm of each output channel's weights, (out,); on the input axis of each input channel's, (in,)."""
        return weight.transpose(0, self._axis(self.dora_axis)).flatten(1).norm(dim=1)

    def _per_channel(self, v: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
        """A (channels,) vector shaped to broadcast along `channel_dim` of an `ndim`-dimensional tensor."""
        shape = [1] * ndim
        shape[channel_dim] = -1
        return v.view(shape)

    def _adapted(self, w: torch.Tensor) -> torch.Tensor:
        """W' at strength 1 from the base weight `w`, differentiable (DoRA's norm detached, as in forward)."""
        combined = w + self.delta_weight()
        if self.magnitude is None:
            return combined
        ratio = self.magnitude / self._weight_norm(combined).detach()
        return combined * self._per_channel(ratio, w.dim(), self._axis(self.dora_axis))

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with another weight (no bias)."""
        if self.is_conv:
            return innermost(self)._conv_forward(x, weight, None)  # the base's padding mode, stride, dilation
        return F.linear(x, weight.T if self.fan_in_fan_out else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.multiplier == 0.0:
            return out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out  # kohya's module dropout: skip the whole adapter for this step
        lx = self.dropout(x)
        if self.magnitude is not None or not autocasting(lx):
            # (Under autocast the matmuls cast their inputs to the compute dtype themselves: an fp32 copy
            # of x for fp32 adapters would only be cast straight back.)
            lx = lx.to(self.lora_down.weight.dtype)
        h = self.lora_down(lx)  # (..., r) or (B, r, *spatial)
        if self.training and self.rank_dropout:  # kohya's rank dropout: zero whole ranks, rescale the rest
            if self.is_conv:
                shape = (h.shape[0], self.rank) + (1,) * (h.dim() - 2)  # per sample and rank
            else:
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)  # per sample and rank, all tokens alike
            keep = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
            h = h * keep / (1.0 - self.rank_dropout)
        if self.magnitude is None:
            up, factor = self.lora_up(h), self.scale * self.multiplier
            if factor != 1.0:  # (alpha = rank at strength 1, the common case: x * 1.0 is x, one op less per call,
                up = up * factor  # and each op is host time that a GPU step at batch 1 waits on: docs/performance.md)
            return out + up.to(out.dtype)
        # DoRA, as peft computes it: the norm is detached (the paper's Section 4.3 memory saving).
        weight = self.base.weight.to(lx.dtype)
        ratio = self.magnitude / self._weight_norm(weight + self.delta_weight().detach()).detach()
        channel = 1 if self.is_conv else -1
        if self.dora_axis == "out":  # W'x = ratio * (W + dW) x: y - Wx = (ratio - 1) Wx + ratio dW x
            ratio = self._per_channel(ratio, out.dim(), channel)
            delta = (ratio - 1) * self._base_op(lx, weight) + ratio * (self.lora_up(h) * self.scale)
        else:  # W'x = (W + dW)(ratio * x): y - Wx = W((ratio - 1) x) + dW (ratio x)
            ratio = self._per_channel(ratio, lx.dim(), channel)
            delta = self._base_op((ratio - 1) * lx, weight) + self.lora_up(self.lora_down(ratio * lx)) * self.scale
        return out + (delta * self.multiplier).to(out.dtype)

    @torch.no_grad()
    def adapted_weight(self) -> torch.Tensor:
        """W' in fp32: the base weight with the update at strength 1 (DoRA's magnitude included)."""
        w = self.base.weight.float()
        combined = w + self.delta_weight().float()
        if self.magnitude is None:
            return combined
        ratio = self.magnitude.float() / self._weight_norm(combined)
        return combined * self._per_channel(ratio, w.dim(), self._axis(self.dora_axis))

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the update at the current strength into the base weight: W + s (W' - W) (faster
        inference). `unmerge` puts back, bitwise, the weight it replaced: a copy is kept (one weight's
        memory) unless keep_original=False, which `lora.bake` uses."""
        if self.merged:
            return
        if isinstance(self.base, LoRALayer) and not self.base.merged:
            raise LoRAError(f"adapter '{self.name}' sits on adapter '{self.base.name}': merge that one first")
        w = self.base.weight
        if w.dtype in FLOAT8:
            raise LoRAError(f"cannot merge into a base weight stored in {w.dtype} ({innermost(self)}): keep the "
                            f"adapter as a separate layer, or merge before the weights are stored in float8")
        merged = w.float() + (self.adapted_weight() - w.float()) * self.multiplier
        self._original_weight = w.detach().clone() if keep_original else None
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the exact base weight that `merge` replaced."""
        if not self.merged:
            return
        if self._original_weight is None:
            raise LoRAError(f"adapter '{self.name}' was merged for good (lora.bake): its base weight cannot be restored")
        self.base.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        dora = f"{self.magnitude is not None}" + (", dora_axis=in" if self.dora_axis == "in" and self.magnitude is not None else "")
        name = f"name={self.name!r}, " if self.name != "default" else ""
        merged = ", merged" if self.merged else ""
        return (f"{name}rank={self.rank}, alpha={self.alpha}, scale={self.scale:.4g}{', rslora' if self.rslora else ''}, "
                f"dora={dora}{merged}")
