"""Benchmark: minsdxl.generate against diffusers' StableDiffusionXLPipeline, same components, one run.

Both sides share the text encoders, tokenizers and VAE (the same objects); the UNets share their
weight tensors. Same prompt, seed, sampler (Euler), steps and guidance. Measures seconds per image
(alternating) and peak memory of one image above the loaded weights (CPU: peak RSS, each side in
its own subprocess; CUDA: torch.cuda.max_memory_allocated). Also prints the largest difference
between the two sides' final latents, which should be ~0.

With --refiner, base + refiner as diffusers documents the "ensemble of experts": its
StableDiffusionXLPipeline(denoising_end=0.8, output_type="latent") then StableDiffusionXLImg2ImgPipeline
(denoising_start=0.8) on those latents, against our generate(..., refiner=, refiner_start=0.8). The
refiner's text encoder is the base's text_encoder_2 object on both sides (as diffusers' example
shares it; the official refiner's OpenCLIP bigG is the base's), its UNet a random refiner UNet whose
weight tensors both sides share. The figures are for the whole image: base steps, refiner steps,
decode.

    python bench/sample.py --config tiny --size 256 --steps 10 --repeats 3
    python bench/sample.py --config tiny --size 64 --steps 5 --repeats 1 --refiner       # dry run
    python bench/sample.py --config base --size 256 --steps 4 --repeats 2              # 2.6B UNet, CPU fp32
    python bench/sample.py --config base --size 1024 --steps 30 --dtype bf16 --device cuda
    python bench/sample.py --config base --size 1024 --steps 30 --dtype bf16 --device cuda --refiner
    python bench/sample.py --config base --size 256 --steps 30 --repeats 2 --channels-last --compile

`--channels-last` and `--compile` apply sample.py's speed flags to our UNet (minsdxl/compile.py);
the reference stays as diffusers ships it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import PeakMemory, device_name, print_table, random_init_, run_child, sdxl_text_encoder_configs, time_alternating  # noqa: E402
from minsdxl import UNet, UNetConfig  # noqa: E402
from minsdxl.compile import compile_repeated_blocks  # noqa: E402
from minsdxl.generate import Models, generate  # noqa: E402
from minsdxl.loading import load_tokenizers  # noqa: E402
from minsdxl.tiny import write_tiny_pipeline  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT, NEGATIVE, GUIDANCE, SEED = "a photo of a corgi on a beach", "blurry", 5.0, 0
REFINER_START = 0.8  # diffusers' documented high_noise_frac


def base_pipeline(tokenizer_dir: str):
    """A full-size SDXL base pipeline with random weights (no download): real configs, tiny tokenizers."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip_l, clip_g = sdxl_text_encoder_configs()
    with torch.device("meta"):  # the 2.6B UNet: no init work, random_init_ fills it below
        unet = UNet2DConditionModel(**UNetConfig.sdxl_base().to_diffusers_config())
    # The text encoders are built for real: their position-id buffers are not in random_init_'s reach.
    parts = dict(unet=random_init_(unet.to_empty(device="cpu"), seed=0),
                 text_encoder=random_init_(CLIPTextModel(clip_l), seed=1),
                 text_encoder_2=random_init_(CLIPTextModelWithProjection(clip_g), seed=2),
                 vae=random_init_(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                                block_out_channels=(128, 256, 512, 512), sample_size=1024,
                                                down_block_types=("DownEncoderBlock2D",) * 4,
                                                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025),
                                  seed=3))
    tok1, tok2 = load_tokenizers(tokenizer_dir)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(tokenizer=tok1, tokenizer_2=tok2, scheduler=scheduler, **parts)


def refiner_pipeline(base, tmp: str, config: str):
    """The refiner over the base's VAE and text_encoder_2 (the same objects), with a random refiner UNet."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    if config == "tiny":  # minsdxl.tiny's refiner: its text encoder 2 is the tiny base's, weight for weight
        unet = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(write_tiny_pipeline(os.path.join(tmp, "tiny-refiner"), refiner=True))).unet
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**UNetConfig.sdxl_refiner().to_diffusers_config())
        unet = random_init_(unet.to_empty(device="cpu"), seed=4)
    return StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2,
                                            tokenizer=None, tokenizer_2=base.tokenizer_2, unet=unet,
                                            scheduler=base.scheduler, requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)


def ours_of(pipe, aesthetic_score: bool) -> Models:
    """Our UNet over the pipeline's UNet's weight tensors (no copy), beside its other components."""
    cfg = UNetConfig.from_diffusers_config(dict(pipe.unet.config), aesthetic_score)
    with torch.device("meta"):
        unet = UNet(cfg)
    unet.load_state_dict(pipe.unet.state_dict(), strict=True, assign=True)  # the same tensors
    encoders = [(te, tok) for te, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
                if te is not None]
    return Models(unet.eval(), pipe.vae, tuple(te for te, _ in encoders), tuple(tok for _, tok in encoders))


def build(args, tmp: str, sides=("reference", "ours")):
    """The diffusers pipelines (base, and the refiner or None) and our Models (the same) over the same components."""
    from diffusers import StableDiffusionXLPipeline

    tiny_dir = write_tiny_pipeline(os.path.join(tmp, "tiny"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir)) if args.config == "tiny" else base_pipeline(str(tiny_dir))
    refiner = refiner_pipeline(pipe, tmp, args.config) if args.refiner else None
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    for p in (pipe, refiner):
        if p is not None:
            p.set_progress_bar_config(disable=True)
            p.to(device, dtype)
    models = ours_of(pipe, False) if "ours" in sides else None
    refiner_models = ours_of(refiner, True) if "ours" in sides and refiner is not None else None
    for m in (models, refiner_models):
        if m is not None:
            if args.channels_last:  # (the convolutions' weights become our own channels-last copies)
                m.unet.to(memory_format=torch.channels_last)
            if args.compile:
                compile_repeated_blocks(m.unet, log=lambda line: print(line, file=sys.stderr))
    if "reference" not in sides:
        pipe.unet = None
        if refiner is not None:
            refiner.unet = None
    return (pipe, refiner), (models, refiner_models)


def runners(args, pipes, models):
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    (pipe, refiner), (base_models, refiner_models) = pipes, models
    common = dict(num_inference_steps=args.steps, guidance_scale=GUIDANCE)

    def reference(output_type="pil"):
        if refiner is None:
            return pipe(PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size, output_type=output_type,
                        generator=torch.Generator().manual_seed(SEED), **common).images
        latents = pipe(PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size, output_type="latent",
                       denoising_end=REFINER_START, generator=torch.Generator().manual_seed(SEED), **common).images
        return refiner(PROMPT, negative_prompt=NEGATIVE, image=latents, denoising_start=REFINER_START,
                       output_type=output_type, generator=torch.Generator().manual_seed(SEED), **common).images

    def ours(return_latents=False):
        return generate(base_models, [PROMPT], [NEGATIVE], steps=args.steps, guidance_scale=GUIDANCE, sampler="euler",
                        seed=SEED, width=args.size, height=args.size, device=device, dtype=dtype,
                        return_latents=return_latents, refiner=refiner_models, refiner_start=REFINER_START)

    return {"reference": reference, "ours": ours}


def main(args):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory_only:  # child: build one side only, generate one image, print the peak of a second
            pipes, models = build(args, tmp, sides=(args.memory_only,))
            run = runners(args, pipes, models)[args.memory_only]
            run()  # first-call costs (lazy imports, allocator and library set-up) are not an image's working memory
            with PeakMemory(args.device) as mem:
                run()
            print(json.dumps({"peak": mem.peak}))
            return
        pipes, models = build(args, tmp)
        run = runners(args, pipes, models)
        with torch.no_grad():
            ref_latents = run["reference"]("latent").float()
            latent_diff = (run["ours"](return_latents=True).float() - ref_latents).abs().max()
            latent_scale = ref_latents.abs().max()
        times = time_alternating(run, args.repeats, args.device)
        rows = [("seconds per image", times["reference"], times["ours"], "s")]
        if torch.device(args.device).type == "cuda":
            peaks = {}
            for side, fn in run.items():
                with PeakMemory(args.device) as mem:
                    fn()
                peaks[side] = mem.peak
        else:
            del pipes, models, run
            gc.collect()  # the pipeline holds reference cycles: free its 14 GB before the children load theirs
            peaks = {side: run_child(__file__, "--memory-only", side)["peak"] for side in ("reference", "ours")}
    rows.append(("peak memory above weights", peaks["reference"], peaks["ours"], "bytes"))
    what = f"base + refiner from {REFINER_START}" if args.refiner else "generation"
    options = ", ".join(name for name, on in (("channels-last", args.channels_last), ("compiled blocks", args.compile)) if on)
    print_table(f"{what}, {args.config}, {args.size}x{args.size}, {args.steps} Euler steps, CFG {GUIDANCE}, "
                f"{args.dtype}, {args.repeats} repeats, {device_name(args.device)}, ours {options or 'eager, NCHW'}; "
                f"max |latents ours - ref| = {latent_diff:.2e} ({latent_diff / latent_scale:.1e} of max |ref|)", rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "base"], default="tiny")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--refiner", action="store_true", help="base + refiner (ensemble of experts, refiner from 0.8)")
    p.add_argument("--channels-last", action="store_true", help="our UNet in channels-last layout")
    p.add_argument("--compile", action="store_true", help="our UNet's repeated blocks compiled")
    p.add_argument("--memory-only", choices=["reference", "ours"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
