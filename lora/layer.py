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
Linear layers and convolutions share the code: for a conv, `down` is a conv with the base's
kernel, stride and padding and `up` a 1x1 conv (LoCon).

A base stored in float8 (a quantised model, e.g. minsdxl.fp8) holds a scaled, rounded copy of its
weight and computes with it in its own forward: adapters on it default to fp32, and what needs the
weight itself (merging, DoRA) is refused rather than computed wrong.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (the meta device has no autocast)."""
    return torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)


class LoRALayer(nn.Module):
    """Wraps an nn.Linear or nn.Conv2d; only `lora_down`, `lora_up` (and DoRA's `magnitude`) train."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, *, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool = False, init: str = "kaiming",
                 rslora: bool = False, dtype: torch.dtype | None = None, dora_axis: str = "out"):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.multiplier = 1.0  # runtime strength, e.g. 0.8 when sampling; not part of training
        self.dropout, self.rank_dropout, self.module_dropout = nn.Dropout(dropout), rank_dropout, module_dropout
        self.merged = False
        stored = base.weight.dtype
        if dora and stored in FLOAT8:
            raise ValueError(f"DoRA reads its base weight, which is stored in {stored} here ({base}): use plain LoRA")
        dtype = dtype or (torch.float32 if stored in FLOAT8 else stored)
        factory = dict(device=base.weight.device, dtype=dtype)  # next to the base weight
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("LoRA on grouped convolutions is not supported")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False, **factory)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        else:
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        self.reset_parameters(init)
        if dora_axis not in ("out", "in"):
            raise ValueError(f"dora_axis must be 'out' or 'in', not '{dora_axis}'")
        self.dora_axis = dora_axis
        self.magnitude = None
        if dora:  # m starts as the norm of W along the axis, so W' = W at initialisation
            self.magnitude = nn.Parameter(self._weight_norm(base.weight.to(factory["dtype"])).detach())

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        if self.lora_down.weight.is_meta:
            return
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # nn.Linear's own default init
        elif init == "gaussian":
            nn.init.normal_(self.lora_down.weight, std=1.0 / self.rank)
        else:
            raise ValueError(f"init must be 'kaiming' or 'gaussian', not '{init}'")
        nn.init.zeros_(self.lora_up.weight)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in the base weight's shape (out, in) or (out, in, kh, kw)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if isinstance(self.base, nn.Linear):
            delta = up @ down  # (out, r) @ (r, in)
        else:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # 1x1 up after a kxk down
        return delta * self.scale

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """L2 norm of each output channel's weights, (out,); on the input axis of each input channel's, (in,)."""
        if self.dora_axis == "in":
            return weight.transpose(0, 1).flatten(1).norm(dim=1)
        return weight.flatten(1).norm(dim=1)

    def _per_channel(self, v: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
        """A (channels,) vector shaped to broadcast along `channel_dim` of an `ndim`-dimensional tensor."""
        shape = [1] * ndim
        shape[channel_dim] = -1
        return v.view(shape)

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b = self.base
        if isinstance(b, nn.Linear):
            return F.linear(x, weight)
        return F.conv2d(x, weight, None, b.stride, b.padding, b.dilation)

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
        h = self.lora_down(lx)  # (..., r) or (B, r, H, W)
        if self.training and self.rank_dropout:  # kohya's rank dropout: zero whole ranks, rescale the rest
            if isinstance(self.base, nn.Conv2d):
                shape = (h.shape[0], self.rank, 1, 1)  # per sample and rank
            else:
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)  # per sample and rank, all tokens alike
            keep = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
            h = h * keep / (1.0 - self.rank_dropout)
        if self.magnitude is None:
            return out + (self.lora_up(h) * (self.scale * self.multiplier)).to(out.dtype)
        # DoRA, as peft computes it: the norm is detached (the paper's Section 4.3 memory saving).
        weight = self.base.weight.to(lx.dtype)
        ratio = self.magnitude / self._weight_norm(weight + self.delta_weight().detach()).detach()
        if self.dora_axis == "out":  # W'x = ratio * (W + dW) x: y - Wx = (ratio - 1) Wx + ratio dW x
            ratio = self._per_channel(ratio, out.dim(), 1 if isinstance(self.base, nn.Conv2d) else -1)
            delta = (ratio - 1) * self._base_op(lx, weight) + ratio * (self.lora_up(h) * self.scale)
        else:  # W'x = (W + dW)(ratio * x): y - Wx = W((ratio - 1) x) + dW (ratio x)
            ratio = self._per_channel(ratio, lx.dim(), 1 if isinstance(self.base, nn.Conv2d) else -1)
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
        return combined * self._per_channel(ratio, w.dim(), 0 if self.dora_axis == "out" else 1)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the update at the current strength into the base weight: W + s (W' - W) (faster
        inference). `unmerge` puts back the exact weight it replaced (kept unless keep_original=False)."""
        if self.merged:
            return
        w = self.base.weight
        if w.dtype in FLOAT8:
            raise ValueError(f"cannot merge into a base weight stored in {w.dtype} ({self.base}): keep the adapter "
                             f"as a separate layer, or merge before the weights are stored in float8")
        merged = w.float() + (self.adapted_weight() - w.float()) * self.multiplier
        self._original_weight = w.detach().clone() if keep_original else None
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if getattr(self, "_original_weight", None) is None:
            raise ValueError("this adapter was merged with keep_original=False: its base weight cannot be restored")
        self.base.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        dora = f"{self.magnitude is not None}" + (", dora_axis=in" if self.dora_axis == "in" and self.magnitude is not None else "")
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:.4g}, dora={dora}"
