"""The SDXL UNet, written out in plain PyTorch: the base and the refiner are this one network.

Follows Podell et al., "SDXL" (2023) and, name for name, diffusers' `UNet2DConditionModel`, so
that a diffusers state dict loads with `load_state_dict(strict=True)`. The official single-file
checkpoint uses other ("SGM") names; minsdxl.convert maps between the two. The refiner is another
`UNetConfig` (`sdxl_refiner()`): four levels instead of three, attention on the middle two only, 1280
text features instead of 2048, five time ids instead of six. Comments say where it differs.

Shape letters used in the comments:
    B  batch            C  channels at the current level     H, W  latent height and width
    L  tokens = H * W   S  text tokens (77)                   D  cross_attention_dim (2048; refiner 1280)
    h  attention heads  d  head dim (64 in SDXL)              E  time embedding width (1280; refiner 1536)
    n  time ids (6; refiner 5)

The path of one latent through `UNet.forward`:
    time + size conditioning -> emb (B, E), added inside every resnet
    conv_in -> down levels (resnets [+ transformers], downsample) -> mid -> up levels (skips
    concatenated) -> GroupNorm, SiLU, conv_out -> noise prediction with the latent's shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpointing
from .config import UNetConfig


# ------------------------------------------------------------------------------------- helpers


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t, cos first (diffusers' `flip_sin_to_cos=True`, shift 0).

    Computed in fp32 whatever the model dtype: in bf16 the timestep 999 rounds to 1000.
    t (N,) -> (N, dim)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def maybe_checkpoint(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """Run `module(*args)`; with gradient checkpointing on, under the module's policy ("full": keep only
    its inputs for backward, "selective": also the outputs that are expensive to recompute;
    minsdxl/checkpointing.py). After minsdxl.compile, the same call compiled."""
    policy = getattr(module, "gradient_checkpointing", None) if torch.is_grad_enabled() else None
    run = getattr(module, "compiled_run", checkpointing.run)
    return run(module, *args, policy=policy)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear: lifts sinusoidal features to the embedding every resnet receives."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ------------------------------------------------------------------------------- building blocks


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding added in between (DDPM's resnet)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_channels, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 conv matches the channel count of the residual when it changes.
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given, else cross-attention to text."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        # A list of one: the checkpoint's key is `to_out.0` (diffusers keeps a Dropout at index 1,
        # which has no weights, so it is left out here).
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, L, C = x.shape
        context = x if context is None else context  # (B, S, D) for cross-attention
        h, d = self.heads, C // self.heads
        q = self.to_q(x).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        k = self.to_k(context).view(B, -1, h, d).transpose(1, 2)  # (B, h, S, d)
        v = self.to_v(context).view(B, -1, h, d).transpose(1, 2)  # (B, h, S, d)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v: (B, h, L, d)
        out = out.transpose(1, 2).reshape(B, L, C)  # (B, L, C)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer, "GLU Variants Improve Transformer", 2020): one Linear gives value and gate."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, inner) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU up to 4x width, Linear back down."""

    def __init__(self, dim: int):
        super().__init__()
        # Index 1 held a weightless Dropout in diffusers; an Identity keeps the down projection at
        # index 2, the checkpoint's key `ff.net.2`.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads)  # image tokens attend to each other
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, context_dim)  # image tokens attend to the 77 text tokens
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, L, C)
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class Transformer2DModel(nn.Module):
    """Flattens the feature map to tokens, runs `depth` transformer blocks, and adds the result back."""

    def __init__(self, channels: int, heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        # eps 1e-6 here (not norm_eps) is what the reference uses before every transformer.
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)  # SDXL uses Linear projections (SD 1.x used 1x1 convs)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, cfg.cross_attention_dim, cfg.norm_eps) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, L, C): one token per latent pixel
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = maybe_checkpoint(block, h, context)
        h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + h


class Downsample2D(nn.Module):
    """Halves H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to the size of the matching skip, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # `size` is usually (2H, 2W); it differs when a latent side was odd on the way down.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One down level: `layers_per_block` resnets (each followed by a transformer if the level has
    attention), then a downsampler unless it is the deepest level."""

    def __init__(self, in_ch: int, out_ch: int, heads: int, depth: int, add_downsample: bool, cfg: UNetConfig):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n)])
        if depth:
            self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, depth, cfg) for _ in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if add_downsample else None  # key: downsamplers.0


class UpBlock(nn.Module):
    """One up level: `layers_per_block + 1` resnets, each fed one skip from the down path, then an
    upsampler unless it is the full-resolution level."""

    def __init__(self, skip_channels: list[int], prev_ch: int, out_ch: int, heads: int, depth: int,
                 add_upsample: bool, cfg: UNetConfig):
        super().__init__()
        ins = [(prev_ch if i == 0 else out_ch) + skip for i, skip in enumerate(skip_channels)]
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_ch, cfg) for c in ins])
        if depth:
            self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, depth, cfg) for _ in ins])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None  # key: upsamplers.0


class MidBlock(nn.Module):
    """At the lowest resolution: resnet, transformer, resnet (in the refiner too, whose deepest level
    has no attention of its own)."""

    def __init__(self, channels: int, heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, depth, cfg)])


# ------------------------------------------------------------------------------------- the UNet


class UNet(nn.Module):
    """The SDXL denoiser: predicts the noise in latents x at timestep t, given text and size conditioning."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        levels = len(ch)

        # Conditioning: timestep features (ch[0] = 320 sinusoids) and the "added" vector of pooled
        # text + sinusoidal time ids (2816 = 1280 + 6 x 256), both lifted to E = 1280 and summed.
        # (Refiner: 384 sinusoids, 2560 = 1280 + 5 x 256, E = 1536.)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.add_embedding = TimestepEmbedding(cfg.adm_in_channels, cfg.time_embed_dim)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Down path. skip_channels records the channels of every tensor pushed onto the skip stack,
        # in order, so the up path knows what it will pop.
        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]  # conv_in's output is the first skip
        for level in range(levels):
            in_ch = ch[level - 1] if level else ch[0]
            last = level == levels - 1
            self.down_blocks.append(DownBlock(in_ch, ch[level], cfg.num_heads[level], cfg.transformer_depth[level], not last, cfg))
            skip_channels += [ch[level]] * cfg.layers_per_block + ([] if last else [ch[level]])

        self.mid_block = MidBlock(ch[-1], cfg.num_heads[-1], cfg.mid_transformer_depth, cfg)

        # Up path, from the deepest level back to full resolution. Each resnet pops one skip.
        self.up_blocks = nn.ModuleList()
        prev_ch = ch[-1]
        for level in reversed(range(levels)):
            skips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(
                UpBlock(skips, prev_ch, ch[level], cfg.num_heads[level], cfg.transformer_depth[level], level > 0, cfg)
            )
            prev_ch = ch[level]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def set_gradient_checkpointing(self, policy: str | bool = True) -> None:
        """What every resnet and transformer block keeps for backward: "full" (True) keeps only its
        inputs and recomputes the rest, "selective" also keeps the outputs that are expensive to
        recompute, "none" (False) keeps everything (minsdxl/checkpointing.py)."""
        policy = checkpointing.policy_name(policy)
        for module in self.modules():
            if isinstance(module, (ResnetBlock2D, BasicTransformerBlock)):
                module.gradient_checkpointing = None if policy == "none" else policy

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                pooled_text: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """x (B, 4, H, W) noisy latents; t (B,) or scalar timesteps; context (B, S, D) text tokens;
        pooled_text (B, 1280); time_ids (B, n), the values named by config.time_ids. Returns the noise
        prediction (B, 4, H, W)."""
        cfg = self.config
        B = x.shape[0]
        if time_ids.shape != (B, cfg.num_time_ids):
            raise ValueError(f"time_ids has shape {tuple(time_ids.shape)}; this UNet takes {cfg.num_time_ids} per "
                             f"sample: {', '.join(cfg.time_ids)}")

        # 1. Time and size conditioning -> emb (B, E)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t  # (B,)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0]).to(x.dtype))  # (B, E)
        ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim).reshape(B, -1)  # (B, n x 256)
        added = torch.cat([pooled_text.to(ids.dtype), ids], dim=-1).to(x.dtype)  # (B, 2816; refiner 2560)
        emb = emb + self.add_embedding(added)

        # 2. Down: every resnet/transformer output and every downsample result is kept as a skip.
        h = self.conv_in(x)  # (B, 320, H, W)
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = maybe_checkpoint(resnet, h, emb)
                if hasattr(block, "attentions"):
                    h = block.attentions[i](h, context)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)  # (B, C, H/2, W/2)
                skips.append(h)

        # 3. Mid, at H/4 x W/4 for SDXL base (H/8 x W/8 for the refiner, one level deeper)
        h = maybe_checkpoint(self.mid_block.resnets[0], h, emb)
        h = self.mid_block.attentions[0](h, context)
        h = maybe_checkpoint(self.mid_block.resnets[1], h, emb)

        # 4. Up: each resnet first concatenates the most recent skip along channels.
        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                h = maybe_checkpoint(resnet, h, emb)
                if hasattr(block, "attentions"):
                    h = block.attentions[i](h, context)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h, size=skips[-1].shape[-2:])  # (B, C, 2H, 2W)

        # 5. Out
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 4, H, W)
