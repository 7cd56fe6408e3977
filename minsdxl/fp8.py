"""fp8 base weights: the frozen UNet's Linear and Conv2d weights stored in float8, upcast per layer.

    report = quantize_fp8(unet, torch.bfloat16)   # in place; then lora.inject(unet, ...) as usual

LoRA training never updates the base weights, so they only need to be good enough to compute
with. kohya's sd-scripts stores them in one byte (`--fp8_base` in train_network.py casts the whole
UNet, `unet.to(dtype=torch.float8_e4m3fn)`, and requires fp16/bf16 mixed precision so that autocast
upcasts each op's inputs), which halves the UNet's 4.8 GiB of bf16 weights. We do the same, with two
differences:

1. A per-tensor scale. e4m3 ("FP8 Formats for Deep Learning", Micikevicius et al. 2022) has 3
   mantissa bits and normal numbers from 2^-6 = 0.0156 to 448. At SDXL's layer sizes most weights
   are smaller than that (PyTorch's default init gives a 3x3 conv over 1280 channels std 0.0054), so
   a plain cast puts them among the subnormals, where the step is a fixed 2^-9. Storing w / s with s = max|w| / 448 uses the whole
   range instead. Measured (relative error ||w_fp8 - w|| / ||w||, 1280x1280 normal weights):

       weight std      0.002   0.005   0.01    0.02    0.05    0.1
       plain cast      28.2%   11.3%   5.7%    3.3%    2.7%    2.6%
       per-tensor s    2.6%    2.6%    2.6%    2.6%    2.6%    2.6%

   Over all 794 Linear/Conv2d layers of SDXL base at PyTorch's default init (what diffusers uses):
   2.55% with the scale, 4.1% plain (14.5% on the 3x3 convs over 2560 channels, std 0.0038). The
   full-size UNet's output then moves by 7.6% (fp8 against bf16 weights, both computed in fp32, random
   weights: tests/test_fp8.py, slow). The tiny test UNet has larger weights (small fan-in), where a
   plain cast does as well (2.5% either way; output 7.2% scaled, 7.5-8.1% plain). So we keep the
   scale: one 0-d fp32 buffer `weight_scale` per layer, next to the unchanged `weight` and `bias` keys.
2. The upcast happens inside the layer (`Float8Linear`, `Float8Conv2d`), with or without autocast,
   and autograd keeps only the float8 weight for the backward pass (`_Float8Op`): the upcast copy
   lives for one layer's forward (or backward) at a time. Plain autograd would keep every layer's
   upcast copy until the backward pass, which is the memory we set out to save.

Biases stay in the compute dtype; norms and the rest of the model are left as they are (load the
UNet in the compute dtype). LoRA adapters wrap the fp8 layers like any nn.Linear / nn.Conv2d and stay
fp32 masters; `lora.merge` refuses float8 bases (merge before quantising instead), and so does DoRA,
which reads the base weight itself. Everything here also runs on the `meta` device (no `.item()`, no
data-dependent branches), so memory planners can build a quantised UNet without any data.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALayer

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value (0b0_1111_110; "fn": no inf, one NaN pattern)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (w / s in float8_e4m3fn, s as a 0-d fp32 tensor) with s = max|w| / 448, so |w / s| <= 448.

    The smallest normal fp32 number added to s is below the rounding of any other scale; it only keeps
    an all-zero weight's w / s at 0 instead of 0/0. (Not a clamp: on the meta device a clamp costs ~1 ms.)"""
    w = w.detach().float()
    scale = w.abs().amax() / FP8_MAX + torch.finfo(torch.float32).tiny
    return (w / scale).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 weight * scale in `dtype`: every e4m3 value is exact in fp32, bf16 and fp16, and the
    product is rounded once (2^-9 relative in bf16, far below e4m3's own 2^-4)."""
    return weight.to(dtype) * scale.to(dtype)


class _Float8Op(torch.autograd.Function):
    """y = layer's op(x, dequantized weight) + bias; backward gives dy/dx only (the base is frozen),
    upcasting the float8 weight again instead of keeping its upcast copy from the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, layer):
        ctx.layer, ctx.x_shape = layer, x.shape
        ctx.save_for_backward(weight, scale)  # the stored float8 tensors: no new memory
        return layer.op(x, dequantize(weight, scale, layer.compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        w = dequantize(weight, scale, grad_out.dtype)  # the output's dtype: bf16 under bf16 autocast
        return ctx.layer.input_grad(grad_out, w, ctx.x_shape), None, None, None, None


class _Float8Layer:
    """What Float8Linear and Float8Conv2d share: storing the weight, the forward pass, the repr."""

    compute_dtype: torch.dtype

    def _store(self, layer: nn.Module, compute_dtype: torch.dtype) -> None:
        weight, scale = quantize_weight(layer.weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(compute_dtype), requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise RuntimeError(f"{type(self).__name__}: its float8 weight and bias are frozen and get no gradient; "
                               f"something set requires_grad on them")
        return _Float8Op.apply(x, self.weight, self.weight_scale, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight {FP8} x per-tensor scale, compute {self.compute_dtype}"


class Float8Linear(_Float8Layer, nn.Linear):
    """nn.Linear with its weight in float8_e4m3fn times `weight_scale`, upcast in each forward."""

    @classmethod
    def from_linear(cls, layer: nn.Linear, compute_dtype: torch.dtype) -> "Float8Linear":
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")  # no allocation
        new._store(layer, compute_dtype)
        return new

    def op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def input_grad(self, grad_out, weight, x_shape):
        return grad_out @ weight  # (..., out) @ (out, in) -> (..., in)


class Float8Conv2d(_Float8Layer, nn.Conv2d):
    """nn.Conv2d with its weight in float8_e4m3fn times `weight_scale`, upcast in each forward."""

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, compute_dtype: torch.dtype) -> "Float8Conv2d":
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"quantize_fp8: only zero-padded convs with numeric padding, not {layer}")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, bias=layer.bias is not None, device="meta")
        new._store(layer, compute_dtype)
        return new

    def op(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, grad_out, weight, x_shape):
        return torch.nn.grad.conv2d_input(x_shape, weight, grad_out, self.stride, self.padding, self.dilation, self.groups)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quantize_fp8(model: nn.Module, compute_dtype: torch.dtype) -> str:
    """Replace, in place, every nn.Linear and nn.Conv2d of `model` by a Float8Linear / Float8Conv2d that
    computes in `compute_dtype`; returns a one-line report. The layers must be frozen (fp8 is for the
    base of LoRA training and for inference). Inside a LoRALayer only the base is replaced: the
    adapters keep their dtype. Layers already in float8 are left as they are."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"quantize_fp8: compute_dtype must be one of {COMPUTE_DTYPES} (the dtype the weights are "
                         f"upcast to), not {compute_dtype}")
    bytes_before = _nbytes([*model.parameters(), *model.buffers()])
    targets = []  # (parent, child name, path): the layers are looked up when replaced, so each old one is freed then
    for parent_path, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent.named_children():
            path = f"{parent_path}.{name}" if parent_path else name
            if isinstance(parent, LoRALayer) and name != "base":
                continue  # the adapters (lora_down, lora_up) train: they stay as they are
            if isinstance(child, LoRALayer) and child.magnitude is not None:
                raise ValueError(f"quantize_fp8: '{path}' is a DoRA layer, whose forward reads its base weight "
                                 f"directly; bake it (lora.bake) before quantising, or use plain LoRA")
            if isinstance(child, (nn.Linear, nn.Conv2d)) and not isinstance(child, _Float8Layer):
                targets.append((parent, name, path))
    if not targets:
        raise ValueError(f"quantize_fp8: {type(model).__name__} has no nn.Linear or nn.Conv2d left to store in float8")
    trainable = [path for parent, name, path in targets if any(p.requires_grad for p in getattr(parent, name).parameters())]
    if trainable:
        raise ValueError(f"quantize_fp8: {len(trainable)} Linear/Conv2d layers have trainable weights (e.g. "
                         f"{trainable[:3]}). float8 storage is for frozen weights only (the base of LoRA training, "
                         f"or inference): freeze them with model.requires_grad_(False) first.")
    new: dict[int, nn.Module] = {}  # a layer shared at two paths is quantised once
    layers_before = layers_after = 0
    for parent, name, _ in targets:
        layer = getattr(parent, name)
        if isinstance(layer, _Float8Layer):
            continue  # the same parent seen at two paths: done already
        if id(layer) not in new:
            convert = Float8Linear.from_linear if isinstance(layer, nn.Linear) else Float8Conv2d.from_conv
            new[id(layer)] = convert(layer, compute_dtype)
            layers_before += _nbytes([*layer.parameters(), *layer.buffers()])
            layers_after += _nbytes([*new[id(layer)].parameters(), *new[id(layer)].buffers()])
        setattr(parent, name, new[id(layer)])
        del layer  # the only reference left: its full-precision weight is freed before the next layer is stored
    bytes_after = _nbytes([*model.parameters(), *model.buffers()])
    return (f"{len(new)} Linear/Conv2d layers stored in {FP8} with a per-tensor scale, computed in {compute_dtype}: "
            f"their weights {layers_before:,} -> {layers_after:,} bytes; the whole model {bytes_before:,} -> "
            f"{bytes_after:,} bytes")
