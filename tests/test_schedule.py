"""The training noise schedule equals diffusers' DDPMScheduler, and Min-SNR weights equal the formula of
diffusers' training scripts (`compute_snr` + `--snr_gamma`), except that ours stay finite at SNR = 0."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from minsdxl.schedule import NoiseSchedule

# SDXL base's training schedule (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json)
SDXL_DDPM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def diffusers_min_snr_weights(scheduler, t, gamma, prediction_type):
    """The weighting in diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py, verbatim."""
    snr = compute_snr(scheduler, t)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return x0, noise, t


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_alphas_cumprod_match_diffusers(zero_terminal_snr):
    ours = NoiseSchedule(zero_terminal_snr=zero_terminal_snr)
    ref = DDPMScheduler(**SDXL_DDPM, rescale_betas_zero_snr=zero_terminal_snr)
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.alphas_cumprod.dtype == torch.float32 and ours.alphas_cumprod.shape == (1000,)


def test_add_noise_and_velocity_match_diffusers(batch):
    x0, noise, t = batch
    ours, ref = NoiseSchedule(), DDPMScheduler(**SDXL_DDPM)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.target(x0, noise, t, "v_prediction"), ref.get_velocity(x0, noise, t))
    assert ours.target(x0, noise, t, "epsilon") is noise
    with pytest.raises(ValueError, match="prediction_type"):
        ours.target(x0, noise, t, "sample")


def test_add_noise_computes_in_fp32_and_keeps_dtype(batch):
    x0, noise, t = batch
    s = NoiseSchedule()
    got = s.add_noise(x0.bfloat16(), noise.bfloat16(), t)
    assert got.dtype == torch.bfloat16
    expected = s.add_noise(x0.bfloat16().float(), noise.bfloat16().float(), t).bfloat16()  # one rounding, at the end
    assert torch.equal(got, expected)


def test_snr_and_min_snr_weights_match_diffusers():
    ours, ref = NoiseSchedule(), DDPMScheduler(**SDXL_DDPM)
    t = torch.arange(1000)
    torch.testing.assert_close(ours.snr(t), compute_snr(ref, t), rtol=1e-5, atol=0)
    for prediction_type in ["epsilon", "v_prediction"]:
        for gamma in [1.0, 5.0]:
            got = ours.min_snr_weights(t, gamma, prediction_type)
            expected = diffusers_min_snr_weights(ref, t, gamma, prediction_type)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
            assert got.shape == (1000,) and got.dtype == torch.float32


def test_min_snr_weights_are_finite_at_zero_snr():
    """With a zero-terminal-SNR schedule SNR(999) = 0: diffusers' formula gives 0/0 = NaN for epsilon models."""
    ours, ref = NoiseSchedule(zero_terminal_snr=True), DDPMScheduler(**SDXL_DDPM, rescale_betas_zero_snr=True)
    t = torch.arange(1000)
    assert ours.snr(t)[-1] == 0
    assert diffusers_min_snr_weights(ref, t, 5.0, "epsilon")[-1].isnan()  # the pitfall
    eps_w, v_w = ours.min_snr_weights(t, 5.0, "epsilon"), ours.min_snr_weights(t, 5.0, "v_prediction")
    assert torch.isfinite(eps_w).all() and torch.isfinite(v_w).all()
    assert eps_w[-1] == 1.0 and v_w[-1] == 0.0  # the limits of min(SNR, γ)/SNR and min(SNR, γ)/(SNR + 1)
    # everywhere else still the diffusers values
    torch.testing.assert_close(eps_w[:-1], diffusers_min_snr_weights(ref, t, 5.0, "epsilon")[:-1], rtol=1e-5, atol=0)
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.equal(ours.add_noise(x0, noise, torch.tensor([999])), noise)  # the last step is pure noise


def test_timestep_bias_weights_as_diffusers_defines_them():
    from minsdxl.schedule import timestep_weights
    assert timestep_weights("none") is None
    w = timestep_weights("later", multiplier=2.0, portion=0.25)  # the last 250 of 1000 twice as likely
    assert w.shape == (1000,) and abs(w.sum().item() - 1) < 1e-6 and w[999] == 2 * w[0] and w[749] == w[0]
    draws = torch.multinomial(w, 100_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((draws >= 750).float().mean().item() - 500 / 1250) < 0.01
    r = timestep_weights("range", multiplier=3.0, begin=200, end=500)
    assert r[200] == r[499] == 3 * r[500] and r[199] == r[500]
    e = timestep_weights("earlier", multiplier=0.5, portion=0.1)
    assert e[99] == 0.5 * e[100]
    with pytest.raises(ValueError, match="--timestep_bias_multiplier 0.0 must be positive"):
        timestep_weights("later", multiplier=0.0)
    with pytest.raises(ValueError, match="begin 600 and --timestep_bias_end 500"):
        timestep_weights("range", begin=600, end=500)
