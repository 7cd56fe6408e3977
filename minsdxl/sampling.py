"""Samplers: from pure noise to a latent image, one UNet call per step.

Four samplers, each written from its paper and equal (tests/test_sampling.py) to the diffusers
scheduler of the same name under SDXL's scheduler config (scaled_linear betas 0.00085 -> 0.012,
`timestep_spacing: leading`, `steps_offset: 1`):

    euler     Euler on the probability-flow ODE       Karras et al. 2022, "Elucidating the Design
                                                      Space of Diffusion-Based Generative Models"
    euler_a   Euler + fresh noise each step           the same, split as DDPM's ancestral step
                                                      (k-diffusion's `sample_euler_ancestral`)
    ddim      DDIM with eta = 0                       Song et al. 2021, "Denoising Diffusion
                                                      Implicit Models", eq. (12)
    dpmpp_2m  second-order multistep DPM-Solver++     Lu et al. 2022, "DPM-Solver++", Algorithm 2

Two views of one noisy latent (minsdxl/schedule.py), at noise level σ = sqrt((1 - ā) / ā):
    z = α x0 + s ε,  α = sqrt(ā) = 1 / sqrt(σ² + 1),  s = sqrt(1 - ā) = σ α
        the unit-variance ("variance preserving") latent the UNet was trained on;
    x = z / α = x0 + σ ε
        the "variance exploding" form of Karras et al., in which Euler takes its steps.
The UNet always receives z. Classifier-free guidance belongs inside the caller's eps_fn.

A run may cover part of the schedule: `sample(..., start=, end=)` takes and returns z at those steps,
which is how image to image starts from a noised image (`noised`, `strength_start`) and how the base
hands over to the refiner (`split_step`), as diffusers' img2img `strength` and `denoising_end` /
`denoising_start` do.

Shape letters: B batch, C latent channels (4), H, W latent height and width, N steps.
docs/sampling.md walks through each update rule.
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import PREDICTION_TYPES, NoiseSchedule

SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m")
STEPS_OFFSET = 1  # SDXL's scheduler config has "steps_offset": 1: the last timestep is 1, not 0
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. (5): rho = 7 spends more steps at low noise

# eps_fn(z (B, C, H, W), t 0-dim fp32 tensor) -> the UNet's prediction (B, C, H, W): ε, or v
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------- the inference schedule


def leading_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers' "leading" spacing with SDXL's offset: [(N-1) r, ..., 2r, r, 0] + 1, r = T // N, fp32 (N,).

    Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2) call it
    leading: with 30 steps SDXL starts at t = 958, not at the last training timestep 999.
    """
    ratio = num_train_timesteps // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.float32) * ratio + STEPS_OFFSET


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022, eq. (5): σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, fp64 (N,)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep whose noise level is σ: log σ interpolated linearly between the two
    neighbouring training timesteps (as diffusers and k-diffusion do). sigma (N,) -> t (N,) fp64."""
    log_sigmas = train_sigmas.double().log()  # (T,), increasing with t
    log_sigma = sigma.double().clamp(min=1e-10).log()  # (N,)
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])  # 0 at low, 1 at low + 1
    return low + w.clamp(0, 1)


def inference_schedule(steps: int, sampler: str = "euler", karras: bool = False,
                       schedule: NoiseSchedule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps (N,) and noise levels σ (N + 1,) that `sampler` visits, both fp32, spaced as SDXL's
    diffusers schedulers space them. Step i calls the UNet at timesteps[i] and goes from σ[i] to σ[i + 1]."""
    schedule = schedule or NoiseSchedule()
    train_sigmas = schedule.sigmas.float()  # (T,), σ of every training timestep
    T = schedule.num_train_timesteps
    if sampler == "dpmpp_2m":
        # DPMSolverMultistepScheduler spaces N + 1 points, r = T // (N + 1), and drops the last one (t = 1).
        timesteps = leading_timesteps(steps + 1, T)[:-1]
    else:
        timesteps = leading_timesteps(steps, T)
    if timesteps.max() > T - 1:
        raise ValueError(f"{steps} steps put the first timestep at {int(timesteps.max())}, past the last "
                         f"training timestep {T - 1}; use fewer steps")
    sigmas = train_sigmas[timesteps.long()]  # (N,)

    if karras:
        # Karras et al.'s spacing between the same end points. The Euler schedulers keep the end points of the
        # leading timesteps; DPMSolverMultistepScheduler uses the whole training range and rounds t to integers.
        if sampler == "dpmpp_2m":
            sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
        else:
            sigma_min, sigma_max = sigmas[-1].item(), sigmas[0].item()
        sigmas64 = karras_sigmas(sigma_max, sigma_min, steps)
        timesteps = sigma_to_t(sigmas64, train_sigmas)
        if sampler == "dpmpp_2m":
            timesteps = timesteps.round()
        sigmas = sigmas64.float()

    # Where the last step lands: σ = 0, the clean latent; DDIM lands on t = 0 (SDXL's config has
    # "set_alpha_to_one": false), whose σ is 0.029.
    last = train_sigmas[:1] if sampler == "ddim" else torch.zeros(1)
    return timesteps.float(), torch.cat([sigmas, last])


# ------------------------------------------------------------------- model output -> prediction


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α = 1 / sqrt(σ² + 1) and s = σ α: the signal and noise scales of the unit-variance latent z."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def predict_x0_eps(out: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor,
                   prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent x0 and the noise ε that the model output `out` implies at z = α x0 + s ε."""
    if prediction_type == "epsilon":
        return (z - s * out) / alpha, out
    # v = α ε - s x0 (Salimans & Ho 2022), so x0 = α z - s v and ε = α v + s z (using α² + s² = 1)
    return alpha * z - s * out, alpha * out + s * z


def denoise(model: EpsFn, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor,
            prediction_type: str) -> torch.Tensor:
    """D(x; σ), the clean latent predicted from x = x0 + σ ε (Karras et al. 2022, sec. 2 and Table 1)."""
    z = x / ((sigma**2 + 1) ** 0.5)  # the UNet's input: x scaled to unit variance (Karras' c_in)
    out = model(z, t)
    if prediction_type == "epsilon":
        return x - sigma * out  # x0 = x - σ ε̂
    # v-prediction: x0 = α z - s v = x / (σ² + 1) - σ / sqrt(σ² + 1) v (Karras' c_skip and c_out)
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) of x's shape, drawn on the generator's device (as diffusers' `randn_tensor`), moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


# --------------------------------------------------------------------------------- the samplers


def sample_euler(model: EpsFn, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ (Karras et al. 2022, eqs. 1 and 3
    with σ(t) = t, s(t) = 1; Algorithm 1 without its second-order correction)."""
    # x_N = x0 + σ_max ε has variance Var[x0] + σ_max² ≈ 1 + σ_max² for unit-variance latents; this is
    # the scale diffusers starts from with "leading" spacing (and the same start as DDIM's z = ε).
    # A run that starts later (image to image, the refiner) gets z at σ[0], which is x / sqrt(σ² + 1) the same way.
    x = noise * (sigmas[0] ** 2 + 1) ** 0.5
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, t, prediction_type)
        d = (x - denoised) / sigma  # dx/dσ, which is ε̂
        x = x + d * (sigma_next - sigma)
    return x / (sigmas[-1] ** 2 + 1) ** 0.5  # back to unit variance for a run that stops early; / 1 at σ = 0


def sample_euler_ancestral(model: EpsFn, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                           prediction_type: str = "epsilon", generator: torch.Generator | None = None) -> torch.Tensor:
    """Each step goes down to σ_down with Euler, then back up to σ_next with fresh noise of std σ_up.

    σ_up² = σ_next² (σ² - σ_next²) / σ² is the variance of DDPM's posterior q(x_next | x, x0) in σ form (Ho et
    al. 2020, eq. 7; DDIM with eta = 1, Song et al. 2021, eq. 16), and σ_down² = σ_next² - σ_up², so the
    total noise at the end of the step is σ_next. As k-diffusion's `sample_euler_ancestral` (K. Crowson).
    """
    x = noise * (sigmas[0] ** 2 + 1) ** 0.5  # as in sample_euler
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, t, prediction_type)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        x = x + randn_like(x, generator) * sigma_up  # drawn at every step, even the last (σ_up = 0), as diffusers
    return x / (sigmas[-1] ** 2 + 1) ** 0.5  # as in sample_euler


def sample_ddim(model: EpsFn, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                prediction_type: str = "epsilon") -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021, eq. 12 with σ_t = 0), in terms of z = α x0 + s ε:
    z_next = α_next x0̂ + s_next ε̂, "the predicted x0" plus "the direction pointing to x_t".
    α and s come from σ (α² = ā up to fp32 rounding); the last step lands on t = 0, not on x0̂."""
    z = noise  # DDIM starts from z = ε: unit variance, no scaling
    for i, t in enumerate(timesteps):
        alpha, s = vp_coefficients(sigmas[i])
        alpha_next, s_next = vp_coefficients(sigmas[i + 1])
        x0, eps = predict_x0_eps(model(z, t), z, alpha, s, prediction_type)
        z = alpha_next * x0 + s_next * eps
    return z


def sample_dpmpp_2m(model: EpsFn, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): exact in the linear part of the ODE, and a linear
    extrapolation of x0̂ from this step and the last one, in the half log-SNR λ = log(α / s).

    One step from λ to λ_next, h = λ_next - λ, r = h_prev / h:
        z_next = (s_next / s) z - α_next (e^-h - 1) (x0̂ + (x0̂ - x0̂_prev) / (2 r))
    The first step has no x0̂_prev and takes the first-order update (DDIM), also when the run starts
    mid-schedule (as a fresh diffusers scheduler does for image to image and the refiner); the last lands on
    σ = 0, λ = ∞, where the update is z = x0̂.
    """
    z = noise  # unit variance, as DDIM
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        alpha, s = vp_coefficients(sigmas[i])
        x0, _ = predict_x0_eps(model(z, t), z, alpha, s, prediction_type)
        if sigmas[i + 1] == 0:
            z = x0  # the first-order update at λ_next = ∞: e^-h = 0, s_next = 0, α_next = 1
            continue
        alpha_next, s_next = vp_coefficients(sigmas[i + 1])
        h = (torch.log(alpha_next) - torch.log(s_next)) - (torch.log(alpha) - torch.log(s))
        z = (s_next / s) * z - (alpha_next * (torch.exp(-h) - 1.0)) * x0  # first order: DDIM
        if x0_prev is not None:
            r = h_prev / h
            z = z - 0.5 * (alpha_next * (torch.exp(-h) - 1.0)) * ((1.0 / r) * (x0 - x0_prev))  # 2nd-order term
        x0_prev, h_prev = x0, h
    return z


def split_step(steps: int, fraction: float, sampler: str = "euler", karras: bool = False,
               num_train_timesteps: int = 1000) -> int:
    """The step at which the first `fraction` of the schedule ends, as diffusers cuts it between an ensemble
    of experts (the base pipeline's `denoising_end`, the refiner's `denoising_start`): the steps whose
    timestep is at or above T (1 - fraction) come before it. 0.8 of SDXL's 30 Euler steps: 23 (timesteps 958
    down to 232; 199 is below 200)."""
    timesteps, _ = inference_schedule(steps, sampler, karras)
    cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))
    return int((timesteps >= cutoff).sum())


def strength_start(steps: int, strength: float) -> int:
    """The first step image to image runs at `strength` (diffusers' img2img `get_timesteps`): the last
    int(steps x strength) steps of the schedule, so strength 1 starts at the first step, from noise at σ_max."""
    return steps - min(int(steps * strength), steps)


def noised(x0: torch.Tensor, noise: torch.Tensor, steps: int, start: int, sampler: str = "euler",
           karras: bool = False) -> torch.Tensor:
    """The clean latent x0 noised to the level of step `start`: z = α x0 + s ε at σ[start] (the unit-variance
    form of the diffusers schedulers' `add_noise`), where image to image starts. x0, noise (B, C, H, W)."""
    _, sigmas = inference_schedule(steps, sampler, karras)
    alpha, s = vp_coefficients(sigmas[start].double())
    return (alpha * x0.double() + s * noise.double()).to(x0.dtype)


def sample(eps_fn: EpsFn, noise: torch.Tensor, steps: int, sampler: str = "euler", karras: bool = False,
           generator: torch.Generator | None = None, prediction_type: str = "epsilon", start: int = 0,
           end: int | None = None) -> torch.Tensor:
    """Run steps start, ..., end - 1 (all by default) of `sampler`'s `steps`-step schedule, one UNet call each.

    noise: the latent at step `start`, (B, C, H, W), in unit-variance form (what the UNet receives): unscaled
    N(0, I) noise at start 0, where diffusers too lets pure noise stand for the latent at σ_max; for image to
    image the init latent `noised` to step `start`; to go on from an earlier run, what it returned (that run's
    `end` being this one's `start`). Returns the latent at step `end` in the same form; after the last step,
    the final latents, to be divided by the VAE's scaling factor and decoded.

    eps_fn(z, t) receives exactly what a UNet receives: the latent scaled to unit variance, z (B, C, H, W) in
    noise's dtype, and the timestep t, a 0-dim fp32 tensor (fractional with Karras sigmas for the Euler
    samplers). It returns the UNet's prediction: ε, or v when prediction_type="v_prediction".
    karras: Karras et al.'s σ spacing (euler, euler_a, dpmpp_2m). generator: the source of euler_a's fresh
    noise, one draw of noise's shape per step, in diffusers' order. Between steps the latents stay in fp32.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if karras and sampler == "ddim":
        raise ValueError("karras=True is offered for euler, euler_a and dpmpp_2m, not ddim (diffusers' "
                         "DDIMScheduler steps on integer training timesteps only)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    end = steps if end is None else end
    if not 0 <= start < end <= steps:
        raise ValueError(f"steps {start} to {end} of {steps}: need 0 <= start < end <= steps")

    timesteps, sigmas = inference_schedule(steps, sampler, karras)
    timesteps, sigmas = timesteps[start:end].to(noise.device), sigmas[start:end + 1].to(noise.device)

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_fn(z.to(noise.dtype), t).float()

    x = noise.float()
    if sampler == "euler":
        x = sample_euler(model, x, timesteps, sigmas, prediction_type)
    elif sampler == "euler_a":
        x = sample_euler_ancestral(model, x, timesteps, sigmas, prediction_type, generator)
    elif sampler == "ddim":
        x = sample_ddim(model, x, timesteps, sigmas, prediction_type)
    else:
        x = sample_dpmpp_2m(model, x, timesteps, sigmas, prediction_type)
    return x.to(noise.dtype)
