"""The CPU demo behind `make demo`: build the tiny SDXL-shaped UNet and denoise one latent.

No download: the tiny preset has SDXL's topology (3 levels, attention on the two lower ones,
GEGLU transformers, time + size conditioning) with random weights and 3 million parameters.
Once train.py lands, the demo becomes a short LoRA training run on a tiny pipeline.
"""

import time

import torch

from minsdxl import UNet, UNetConfig


def main():
    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    unet = UNet(cfg).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"tiny SDXL UNet: {n_params:,} parameters (the real one: 2,567,463,684)")

    B, H, W = 2, 32, 32  # latents of a 256 x 256 image (the VAE downsamples 8x)
    x = torch.randn(B, cfg.in_channels, H, W)  # noisy latents
    t = torch.tensor([999, 10])  # one timestep per sample
    context = torch.randn(B, 77, cfg.cross_attention_dim)  # text tokens (both encoders, concatenated)
    pooled = torch.randn(B, cfg.pooled_text_dim)  # pooled text-encoder-2 output
    time_ids = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * B)  # original size, crop, target size

    start = time.perf_counter()
    with torch.no_grad():
        eps = unet(x, t, context, pooled, time_ids)
    print(f"forward: latents {tuple(x.shape)} -> noise prediction {tuple(eps.shape)} "
          f"in {time.perf_counter() - start:.2f} s on the CPU")
    print("mean |eps| =", f"{eps.abs().mean().item():.4f}", "(random weights: the number means nothing yet)")


if __name__ == "__main__":
    main()
