"""Each sampler equals the diffusers scheduler of the same name, driven the way StableDiffusionXLPipeline
drives it (noise * init_noise_sigma, scale_model_input, UNet, step), with the same eps_fn and noise; and
driven part of the way, as StableDiffusionXLImg2ImgPipeline drives it for image to image (`strength`:
add_noise at the first step kept) and for the refiner after the base (`denoising_end` / `denoising_start`).

The eps_fn is a fixed, deterministic stand-in for a UNet: a random channel-mixing linear map of its input,
a small nonlinearity and a timestep-dependent term, so that a wrong scaling, a wrong timestep or a wrong
step rule all change the result. Errors are max |ours - ref| / max |ref| in fp32 over 30 steps.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from minsdxl.sampling import SAMPLERS, inference_schedule, noised, sample, split_step, strength_start

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
REFERENCE = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
CASES = [("euler", False), ("euler", True), ("euler_a", False), ("euler_a", True), ("ddim", False),
         ("dpmpp_2m", False), ("dpmpp_2m", True)]


def make_eps_fn(channels: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = 0.8 * torch.eye(channels) + 0.1 * torch.randn(channels, channels, generator=g)  # (C, C)
    bias = torch.randn(channels, 1, 1, generator=g)

    def eps_fn(z, t):
        t = torch.as_tensor(t, dtype=torch.float32)
        mixed = (mix @ z.flatten(2)).view_as(z)  # (C, C) @ (B, C, H*W) -> (B, C, H*W) -> (B, C, H, W)
        return mixed + 0.1 * torch.tanh(z) + 0.2 * torch.cos(t / 150) * bias

    return eps_fn


def reference_scheduler(sampler, steps, karras=False, prediction_type="epsilon"):
    """The diffusers scheduler with SDXL's config, its timesteps set for `steps`."""
    config = SDXL_SCHEDULER_CONFIG | {"prediction_type": prediction_type}
    if sampler == "euler_a" and karras:
        # EulerAncestralDiscreteScheduler has no Karras option: give it the Karras sigmas and timesteps of
        # EulerDiscreteScheduler, which is what our euler_a uses.
        scheduler = EulerAncestralDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        karras_euler = reference_scheduler("euler", steps, karras=True, prediction_type=prediction_type)
        scheduler.sigmas, scheduler.timesteps = karras_euler.sigmas, karras_euler.timesteps
        return scheduler
    if karras:
        config["use_karras_sigmas"] = True
    scheduler = REFERENCE[sampler].from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def run_reference(scheduler, eps_fn, noise, generator=None):
    """StableDiffusionXLPipeline's denoising loop, without guidance."""
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        z = scheduler.scale_model_input(x, t)
        x = scheduler.step(eps_fn(z, t), t, x, generator=generator).prev_sample
    return x


def run_reference_steps(scheduler, eps_fn, x, timesteps, generator=None):
    """The denoising loop over some of the scheduler's timesteps, from x in the scheduler's own form."""
    for t in timesteps:
        x = scheduler.step(eps_fn(scheduler.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
    return x


def reference_split(sampler, karras, steps, fraction, eps_fn, noise, seed):
    """StableDiffusionXLPipeline(denoising_end=fraction) then, on its latents, a second pipeline's scheduler
    with StableDiffusionXLImg2ImgPipeline(denoising_start=fraction)'s timesteps (each pipeline its own generator)."""
    cutoff = int(round(1000 - fraction * 1000))  # both pipelines' discrete_timestep_cutoff
    first = reference_scheduler(sampler, steps, karras)
    n = len([t for t in first.timesteps if t >= cutoff])
    x = run_reference_steps(first, eps_fn, noise * first.init_noise_sigma, first.timesteps[:n],
                            torch.Generator().manual_seed(seed))
    second = reference_scheduler(sampler, steps, karras)
    t_start = len(second.timesteps) - (second.timesteps < cutoff).sum().item()
    if hasattr(second, "set_begin_index"):  # DDIM has none (it steps by timestep), as the pipeline checks
        second.set_begin_index(t_start)
    return n, run_reference_steps(second, eps_fn, x, second.timesteps[t_start:], torch.Generator().manual_seed(seed))


def reference_img2img(sampler, karras, steps, strength, eps_fn, x0, noise, seed):
    """StableDiffusionXLImg2ImgPipeline's get_timesteps, prepare_latents (add_noise) and loop."""
    scheduler = reference_scheduler(sampler, steps, karras)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[t_start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    x = scheduler.add_noise(x0, noise, timesteps[:1])
    return t_start, run_reference_steps(scheduler, eps_fn, x, timesteps, torch.Generator().manual_seed(seed))


def rel_err(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("steps", [1, 7, 30, 50])
@pytest.mark.parametrize("sampler,karras", CASES)
def test_timesteps_and_sigmas_match_diffusers(sampler, karras, steps):
    timesteps, sigmas = inference_schedule(steps, sampler, karras)
    ref = reference_scheduler(sampler, steps, karras)
    assert timesteps.shape == (steps,) and sigmas.shape == (steps + 1,)
    if karras and sampler != "dpmpp_2m":
        # fractional timesteps, from a log-interpolation in fp64: equal up to fp32 rounding (1 ulp at t ~ 1000)
        torch.testing.assert_close(timesteps, ref.timesteps.float(), rtol=0, atol=1.5e-4)
    else:
        assert torch.equal(timesteps, ref.timesteps.float()), (timesteps, ref.timesteps)
    if sampler != "ddim":  # DDIMScheduler has no sigmas; it indexes alphas_cumprod with the timesteps
        torch.testing.assert_close(sigmas, ref.sigmas.float(), rtol=1e-6, atol=0)


def test_sdxl_30_step_timesteps():
    """The numbers a reader can check by hand: r = 1000 // 30 = 33, offset 1."""
    assert inference_schedule(30, "euler")[0][[0, 1, -1]].tolist() == [958.0, 925.0, 1.0]
    assert inference_schedule(30, "dpmpp_2m")[0][[0, 1, -1]].tolist() == [961.0, 929.0, 33.0]  # r = 1000 // 31


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,karras", CASES)
def test_sampler_matches_diffusers(sampler, karras, prediction_type):
    steps = 30
    eps_fn = make_eps_fn()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = sample(eps_fn, noise, steps, sampler, karras=karras, generator=torch.Generator().manual_seed(2),
                 prediction_type=prediction_type)
    ref = reference_scheduler(sampler, steps, karras, prediction_type)
    expected = run_reference(ref, eps_fn, noise, generator=torch.Generator().manual_seed(2))
    err = rel_err(got, expected)
    print(f"\n{sampler} karras={karras} {prediction_type}: max |ours - diffusers| / max |diffusers| = {err:.2e}")
    assert err <= 1e-5
    assert got.shape == noise.shape and got.dtype == noise.dtype


@pytest.mark.parametrize("sampler,karras", CASES)
@pytest.mark.parametrize("steps,fraction", [(30, 0.8), (10, 0.7), (7, 0.5)])
def test_split_between_two_models_matches_diffusers(sampler, karras, steps, fraction):
    """The base runs the first `fraction` of the schedule and returns a partly denoised latent; the refiner
    goes on from there with a fresh sampler (DPM++ 2M starts first-order again, as diffusers' does)."""
    eps_fn, other = make_eps_fn(seed=0), make_eps_fn(seed=5)  # two different "models"
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    end = split_step(steps, fraction, sampler, karras)
    half = sample(eps_fn, noise, steps, sampler, karras=karras, generator=torch.Generator().manual_seed(2), end=end)
    got = sample(other, half, steps, sampler, karras=karras, generator=torch.Generator().manual_seed(2), start=end)

    def two_models(z, t):  # the reference's loop runs one eps_fn: switch at the split's timestep
        return (eps_fn if t >= inference_schedule(steps, sampler, karras)[0][end - 1] else other)(z, t)

    n, expected = reference_split(sampler, karras, steps, fraction, two_models, noise, seed=2)
    assert end == n and 0 < end < steps
    assert rel_err(got, expected) <= 1e-5
    # One run in two halves is the whole run (with one model and a deterministic sampler)
    if sampler != "euler_a":
        whole = sample(eps_fn, noise, steps, sampler, karras=karras)
        parts = sample(eps_fn, sample(eps_fn, noise, steps, sampler, karras=karras, end=end), steps, sampler,
                       karras=karras, start=end)
        assert (rel_err(parts, whole) <= 1e-5) == (sampler != "dpmpp_2m")  # DPM++ 2M restarts first-order


@pytest.mark.parametrize("sampler,karras", CASES)
@pytest.mark.parametrize("strength", [0.3, 0.7, 1.0])
def test_image_to_image_matches_diffusers(sampler, karras, strength):
    steps, eps_fn = 10, make_eps_fn()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    start = strength_start(steps, strength)
    got = sample(eps_fn, noised(x0, noise, steps, start, sampler, karras), steps, sampler, karras=karras,
                 generator=torch.Generator().manual_seed(2), start=start)
    t_start, expected = reference_img2img(sampler, karras, steps, strength, eps_fn, x0, noise, seed=2)
    assert start == t_start == {0.3: 7, 0.7: 3, 1.0: 0}[strength]
    assert rel_err(got, expected) <= 1e-5


def test_split_and_strength_steps():
    """diffusers' arithmetic: the cutoff timestep round(T (1 - fraction)), the steps int(N x strength)."""
    # 30 Euler steps call the UNet at 958, 925, ..., 232, 199, ...: 23 of them at or above 200 = 1000 (1 - 0.8).
    # DPM++ 2M's spacing (r = 1000 // 31: 961, ..., 225, 193) gives 24.
    assert split_step(30, 0.8) == 23 and split_step(30, 0.8, "dpmpp_2m") == 24 and split_step(40, 0.8) == 32
    assert split_step(10, 0.7) == 7 and split_step(25, 0.0) == 0 and split_step(25, 1.0) == 25
    assert strength_start(10, 0.3) == 7 and strength_start(10, 0.7) == 3  # 10 x 0.7 = 7.000000000000001
    assert strength_start(100, 0.29) == 72  # 100 x 0.29 = 28.999999999999996: int() gives 28, as in diffusers
    assert strength_start(30, 1.0) == 0 and strength_start(30, 0.01) == 30  # 0: no step would run


def test_eps_fn_receives_what_the_unet_receives():
    """Scaled latents (unit variance at every step) and the scheduler's timestep, in the scheduler's order."""
    calls = []

    def recording_eps_fn(z, t):
        calls.append((z.clone(), t))
        return torch.zeros_like(z)

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sample(recording_eps_fn, noise, 5, "euler")
    ref = reference_scheduler("euler", 5)
    assert [float(t) for _, t in calls] == ref.timesteps.tolist()
    torch.testing.assert_close(calls[0][0], noise)  # the first input is the noise: (sqrt(σ²+1) ε) / sqrt(σ²+1)
    assert all(t.ndim == 0 and t.dtype == torch.float32 for _, t in calls)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exact_denoiser_of_a_single_point(sampler, prediction_type):
    """If the data set is one latent m, the exact model reads ε = (z - α m) / s off z = α m + s ε. Every
    sampler then lands on m; DDIM, whose ε̂ never changes after the first step, on α_0 m + s_0 ε̂ at t = 0."""
    m = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    alphas_cumprod = reference_scheduler("ddim", 10).alphas_cumprod

    def exact_fn(z, t):
        # z's noise level, from the timestep; fractional Karras timesteps are not used here
        a = alphas_cumprod[int(t)]
        eps = (z - a**0.5 * m) / (1 - a) ** 0.5
        return eps if prediction_type == "epsilon" else a**0.5 * eps - (1 - a) ** 0.5 * m  # v

    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    got = sample(exact_fn, noise, 10, sampler, prediction_type=prediction_type)
    if sampler == "ddim":
        a_first, a0 = alphas_cumprod[int(inference_schedule(10, "ddim")[0][0])], alphas_cumprod[0]
        eps = (noise - a_first**0.5 * m) / (1 - a_first) ** 0.5  # what the model sees in the first z = noise
        expected = a0**0.5 * m + (1 - a0) ** 0.5 * eps
    else:
        expected = m
    assert rel_err(got, expected) <= 1e-5


def test_euler_a_noise_comes_from_the_generator():
    eps_fn, noise = make_eps_fn(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = sample(eps_fn, noise, 10, "euler_a", generator=torch.Generator().manual_seed(1))
    b = sample(eps_fn, noise, 10, "euler_a", generator=torch.Generator().manual_seed(1))
    c = sample(eps_fn, noise, 10, "euler_a", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_low_precision_noise_keeps_its_dtype():
    seen = []

    def eps_fn(z, t):
        seen.append(z.dtype)
        return make_eps_fn()(z.float(), t).to(z.dtype)

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = sample(eps_fn, noise.bfloat16(), 8, "dpmpp_2m")
    expected = sample(make_eps_fn(), noise.bfloat16().float(), 8, "dpmpp_2m")
    assert got.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert rel_err(got.float(), expected) <= 5e-2  # bf16 model inputs and outputs, fp32 latents in between


def test_bad_arguments_are_refused():
    eps_fn, noise = make_eps_fn(), torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(eps_fn, noise, 10, "heun")
    with pytest.raises(ValueError, match="not ddim"):
        sample(eps_fn, noise, 10, "ddim", karras=True)
    with pytest.raises(ValueError, match="prediction_type"):
        sample(eps_fn, noise, 10, prediction_type="sample")
    with pytest.raises(ValueError, match="steps"):
        sample(eps_fn, noise, 0)
    with pytest.raises(ValueError, match="past the last training timestep"):
        inference_schedule(1000, "euler")
    with pytest.raises(ValueError, match="steps 7 to 7 of 10"):
        sample(eps_fn, noise, 10, start=7, end=7)
    with pytest.raises(ValueError, match="steps 0 to 11 of 10"):
        sample(eps_fn, noise, 10, end=11)
