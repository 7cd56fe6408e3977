"""Where the memory of a LoRA training step goes, computed from the config and the options.

    python -m minsdxl.memory --resolution 1024 --rank 16 --checkpointing        # SDXL base, bf16
    python -m minsdxl.memory --resolution 512 --no-checkpointing --markdown

Weights, adapters, gradients and optimizer state are sizes times bytes. Activations are measured
by running the forward pass on the `meta` device (shapes, no data, about a second for the full
model) with autograd's saved-tensor hooks: every tensor autograd keeps for the backward pass is
one activation. Attention matrices (B, heads, L, S) are counted apart: on a GPU the fused SDPA
kernels never store them; the "math" fallback does. With gradient checkpointing each resnet and
transformer block keeps only its input, and one block's activations exist again while it is
recomputed in the backward pass, so the cost is (outside the blocks) + (block inputs) + (the
largest block). Not counted: the CUDA context (~0.3-0.5 GB), allocator fragmentation, and the
temporaries of single kernels.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import lora

from .config import UNetConfig
from .lora_files import LORA_TARGET_PRESETS
from .unet import BasicTransformerBlock, ResnetBlock2D, UNet

ATTN_TARGETS = LORA_TARGET_PRESETS["attn"]  # train.py's default --lora_targets
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 4, "prodigy": 16}  # per fp32 trainable parameter
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Budget:
    """Bytes of one training step, by kind."""

    weights: int  # the frozen UNet
    adapters: int  # LoRA weights, fp32
    gradients: int  # their gradients, fp32
    optimizer: int  # optimizer state
    activations: int  # kept for the backward pass
    attention_matrices: int  # (B, heads, L, S) scores, if SDPA falls back to the math kernel (largest one)

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [("frozen UNet weights", self.weights), ("LoRA adapters (fp32)", self.adapters),
                ("gradients (fp32)", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("total (fused attention)", self.total),
                ("+ attention matrix if SDPA uses the math kernel", self.attention_matrices)]


def _activation_bytes(unet: UNet, x, t, context, pooled, time_ids) -> tuple[int, dict[int, int], int, int, int]:
    """Run forward on meta; returns (bytes saved outside blocks, {block: bytes saved inside},
    block input bytes, largest attention matrix bytes, bytes of all attention matrices)."""
    params = {id(p) for p in unet.parameters()}
    B, _, H, W = x.shape
    heads = set(unet.config.num_heads)
    tokens = {(H >> level) * (W >> level) for level in range(len(unet.config.block_out_channels))}  # L per level

    def is_attention_matrix(t: torch.Tensor) -> bool:
        """(B, heads, L, S) with L a level's token count and S = L (self) or the text length (cross)."""
        return (t.dim() == 4 and t.shape[0] == B and t.shape[1] in heads and t.shape[2] in tokens
                and t.shape[3] in (t.shape[2], context.shape[1]))
    seen: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive so that ids stay unique
    inside: dict[int, int] = {}
    outside = [0]
    current: list[int] = []
    block_inputs = [0]
    attn = [0, 0]

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor  # a transposed weight is a view of it
        if id(base) in params or id(tensor) in seen or not tensor.is_floating_point():
            return tensor
        seen[id(tensor)] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        if is_attention_matrix(tensor):  # (B, heads, L, S) scores or probabilities
            attn[0] = max(attn[0], nbytes)
            attn[1] += nbytes
            return tensor
        if current:
            inside[current[-1]] = inside.get(current[-1], 0) + nbytes
        else:
            outside[0] += nbytes
        return tensor

    hooks = []
    for m in unet.modules():
        if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)):
            def pre(mod, inputs):
                current.append(id(mod))
                block_inputs[0] += inputs[0].numel() * inputs[0].element_size()
            def post(mod, inputs, output):
                current.pop()  # (returning nothing: a forward hook's return value would replace the output)
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, context, pooled, time_ids)
    for h in hooks:
        h.remove()
    return outside[0], inside, block_inputs[0], attn[0], attn[1]


def training_budget(cfg: UNetConfig, resolution: int = 1024, batch: int = 1, rank: int = 16, targets=ATTN_TARGETS,
                    checkpointing: bool = True, dtype: torch.dtype = torch.bfloat16, optimizer: str = "adamw") -> Budget:
    """The memory of one LoRA training step of UNet(cfg) (text and latents cached, as train.py does)."""
    with torch.device("meta"):
        unet = UNet(cfg).to(dtype)
        side = resolution // 8
        x = torch.zeros(batch, cfg.in_channels, side, side, dtype=dtype)
        context = torch.zeros(batch, 77, cfg.cross_attention_dim, dtype=dtype)
        pooled, time_ids = torch.zeros(batch, cfg.pooled_text_dim, dtype=dtype), torch.zeros(batch, 6, dtype=dtype)
        t = torch.full((batch,), 500.0)
    frozen = sum(p.numel() * p.element_size() for p in unet.parameters())
    lora.inject(unet, list(targets), rank=rank, alpha=rank, dtype=torch.float32)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):  # the dtypes of a real step
        outside, inside, inputs, attn_max, attn_all = _activation_bytes(unet, x, t, context, pooled, time_ids)
    if checkpointing:
        activations = outside + inputs + max(inside.values(), default=0)
        attention = attn_max
    else:
        activations = outside + sum(inside.values())
        attention = attn_all
    return Budget(frozen, 4 * trainable, 4 * trainable, OPTIMIZER_STATE_BYTES[optimizer] * trainable, activations, attention)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["sdxl_base", "tiny"], default="sdxl_base")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--optimizer", choices=OPTIMIZER_STATE_BYTES, default="adamw")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if args.resolution % 64 or args.resolution < 64:
        p.error(f"--resolution {args.resolution} must be a positive multiple of 64 (the VAE's 8 x the UNet's 2x downsamplings)")
    cfg = UNetConfig.sdxl_base() if args.config == "sdxl_base" else UNetConfig.tiny()
    budget = training_budget(cfg, args.resolution, args.batch, args.rank, checkpointing=args.checkpointing,
                             dtype=DTYPES[args.dtype], optimizer=args.optimizer)
    title = (f"{args.config}, {args.resolution}x{args.resolution}, batch {args.batch}, rank {args.rank} on "
             f"{'/'.join(ATTN_TARGETS)}, {args.dtype}, {args.optimizer}, checkpointing {'on' if args.checkpointing else 'off'}")
    if args.markdown:
        print(f"| {title} | GiB |\n| --- | ---: |")
        for name, n in budget.rows():
            print(f"| {name} | {n / 2**30:.2f} |")
        return
    print(title)
    for name, n in budget.rows():
        print(f"  {name:<48} {n / 2**30:8.2f} GiB")


if __name__ == "__main__":
    main()
