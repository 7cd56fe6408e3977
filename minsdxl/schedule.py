"""The noise schedule SDXL was trained with, and what training needs from it.

Follows Ho et al., "Denoising Diffusion Probabilistic Models" (2020): a noisy latent at training
timestep t in [0, T) is

    x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) ε,    ε ~ N(0, I),    ā_t = prod_{s <= t} (1 - β_s)

SDXL uses T = 1000 and "scaled_linear" betas (the Latent Diffusion schedule): the square roots of
β run linearly from sqrt(0.00085) to sqrt(0.012). Same values as diffusers' `DDPMScheduler` with
SDXL's scheduler config (checked in tests/test_schedule.py).

The other quantities used in this project are all functions of ā_t:
    SNR(t) = ā_t / (1 - ā_t)                   signal-to-noise ratio of x_t
    σ_t    = sqrt((1 - ā_t) / ā_t) = SNR^-1/2  the same noise level in the "x0 + σ ε" form of
                                               Karras et al. 2022, used by the samplers
    v_t    = sqrt(ā_t) ε - sqrt(1 - ā_t) x0    the v-prediction target (Salimans & Ho 2022)

Everything is computed in fp32 on the device of the timesteps, whatever the latents' dtype.
Shape letters: B batch, T number of training timesteps.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' names; SDXL base predicts epsilon


class NoiseSchedule:
    """The DDPM forward process: betas, ā_t, and the noising/target/weighting functions of t."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 zero_terminal_snr: bool = False):
        T = num_train_timesteps
        # scaled_linear: linear in sqrt(beta). SDXL: 0.00085 -> 0.012 over 1000 steps.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2  # (T,)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.num_train_timesteps = T
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # ā_t, (T,), from 0.99915 down to 0.00467

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1 - ā_t) / ā_t) for every training timestep, (T,): 0.029 at t=0, 14.6 at t=999."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(ā_t) and sqrt(1 - ā_t) for integer timesteps t (B,), fp32 on like's device, shaped (B, 1, ..., 1)
        to broadcast against like (B, ...)."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]  # (B,) fp32
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (a**0.5).view(shape), ((1 - a) ** 0.5).view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) ε. x0, noise (B, ...); t (B,) integer timesteps."""
        signal, noise_level = self._coefficients(t, x0)
        return (signal * x0.float() + noise_level * noise.float()).to(x0.dtype)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_t = sqrt(ā_t) ε - sqrt(1 - ā_t) x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""
        signal, noise_level = self._coefficients(t, x0)
        return (signal * noise.float() - noise_level * x0.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               prediction_type: str = "epsilon") -> torch.Tensor:
        """What the UNet should output for x_t = add_noise(x0, noise, t): ε, or v for v-prediction models."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ā_t / (1 - ā_t), (B,) fp32: about 1175 at t=0 and 0.0047 at t=999 (0 with zero terminal SNR)."""
        a = self.alphas_cumprod.to(t.device)[t.long()]
        return a / (1 - a)

    def min_snr_weights(self, t: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
        """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
        Weighting Strategy", sec. 3.4 and 4.2), for an MSE loss on the model's own target.

        Weighting the x0-error by min(SNR, γ) is, in terms of the ε-error, a weight min(SNR, γ) / SNR,
        and in terms of the v-error min(SNR, γ) / (SNR + 1). Same values as diffusers' training scripts
        (`compute_snr` + `--snr_gamma`), but finite at SNR = 0 (the last step of a zero-terminal-SNR
        schedule), where those scripts divide 0 by 0. Returns (B,) fp32.
        """
        snr = self.snr(t)
        if prediction_type == "epsilon":
            # min(SNR, γ) / SNR = min(1, γ / SNR): γ / 0 = inf, so SNR = 0 gets weight 1 (the limit), not NaN.
            return (gamma / snr).clamp(max=1.0)
        if prediction_type == "v_prediction":
            return snr.clamp(max=gamma) / (snr + 1)  # the denominator is >= 1: safe at SNR = 0
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ā_t) so that ā_{T-1} = 0 exactly, keeping ā_0 (Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", Algorithm 1). The last step is then pure noise (SNR 0).
    Not SDXL's training schedule; offered for models trained with it and to test SNR = 0 handling."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()  # sqrt(ā_t), (T,)
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # last -> 0, first unchanged
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # undo the cumulative product
    return 1 - alphas


TIMESTEP_BIAS = ("none", "earlier", "later", "range")  # --timestep_bias_strategy, diffusers' names


def timestep_weights(strategy: str, multiplier: float = 1.0, portion: float = 0.25, begin: int = 0, end: int = 1000,
                     num_train_timesteps: int = 1000) -> torch.Tensor | None:
    """(T,) sampling probabilities of the training timesteps with diffusers' --timestep_bias_* flags
    (train_text_to_image_sdxl.py's generate_timestep_weights); None for "none" (uniform: torch.randint).

    "earlier" / "later" multiply the weight of the first / last `portion` of the timesteps by
    `multiplier` (low t: fine detail, high t: composition); "range" those in [begin, end)."""
    T = num_train_timesteps
    if strategy == "none":
        return None
    if multiplier <= 0:
        raise ValueError(f"--timestep_bias_multiplier {multiplier} must be positive (to train on all timesteps "
                         f"equally use --timestep_bias_strategy none)")
    n = int(portion * T)
    chosen = {"earlier": slice(0, n), "later": slice(T - n, T), "range": slice(begin, end)}[strategy]
    if strategy == "range" and not 0 <= begin < end <= T:
        raise ValueError(f"--timestep_bias_begin {begin} and --timestep_bias_end {end} must satisfy 0 <= begin < end <= {T}")
    weights = torch.ones(T)
    weights[chosen] *= multiplier
    return weights / weights.sum()
