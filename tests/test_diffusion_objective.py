"""SDXL diffusion objective against diffusers' DDPMScheduler and the published formulas."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from lumina_illus.config import ConfigError, from_dict
from lumina_illus.objectives.diffusion import (
    DiffusionConfig,
    NoiseSchedule,
    sample_noise,
    sample_timesteps,
    scaled_linear_betas,
)

torch.set_num_threads(1)


def _ddpm(ztsnr: bool, prediction: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        rescale_betas_zero_snr=ztsnr,
        prediction_type=prediction,
    )


@pytest.mark.parametrize("ztsnr", [False, True])
def test_betas_match_diffusers(ztsnr):
    ours = scaled_linear_betas(DiffusionConfig(zero_terminal_snr=ztsnr))
    assert ours.shape == (1000,) and ours.dtype == torch.float64
    plain64 = scaled_linear_betas(DiffusionConfig())
    ref64 = rescale_zero_terminal_snr(plain64) if ztsnr else plain64
    torch.testing.assert_close(ours, ref64, rtol=1e-12, atol=0)  # diffusers' own function, same precision
    # the scheduler itself works in float32; its ZTSNR betas lose ~1e-4 relative precision
    ddpm = _ddpm(ztsnr)
    torch.testing.assert_close(ours.float(), ddpm.betas, rtol=5e-4, atol=1e-6)
    ab = torch.cumprod(1 - ours, 0)
    torch.testing.assert_close(ab.float(), ddpm.alphas_cumprod, rtol=1e-4, atol=1e-6)


def test_ztsnr_terminal_alpha_bar_is_zero_and_first_kept():
    plain = NoiseSchedule.from_config(DiffusionConfig())
    z = NoiseSchedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    assert z.alphas_cumprod[-1].item() == 0.0
    assert plain.alphas_cumprod[-1].item() > 0.004  # the SDXL schedule leaks signal at T-1
    assert math.isclose(z.alphas_cumprod[0].item(), plain.alphas_cumprod[0].item(), rel_tol=1e-12)
    assert torch.all(z.alphas_cumprod[1:] < z.alphas_cumprod[:-1])  # still strictly decreasing


@pytest.mark.parametrize("ztsnr", [False, True])
def test_add_noise_and_velocity_match_diffusers(ztsnr):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 6, generator=g)
    noise = torch.randn(4, 4, 8, 6, generator=g)
    ts = torch.tensor([0, 321, 998, 999])
    ours = NoiseSchedule.from_config(DiffusionConfig(prediction="v", zero_terminal_snr=ztsnr))
    ref = _ddpm(ztsnr, "v_prediction")
    torch.testing.assert_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.velocity(x0, noise, ts), ref.get_velocity(x0, noise, ts), rtol=1e-5, atol=1e-5)
    if ztsnr:  # terminal step: pure noise in, v = -x0 out
        torch.testing.assert_close(ours.add_noise(x0, noise, ts)[3], noise[3])
        torch.testing.assert_close(ours.velocity(x0, noise, ts)[3], -x0[3])


def test_predict_x0_eps_inverts_both_parameterisations():
    sched = NoiseSchedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    ts = torch.tensor([10, 500, 999])
    x_t = sched.add_noise(x0, noise, ts)
    x0_v, eps_v = sched.predict_x0_eps("v", sched.velocity(x0, noise, ts), x_t, ts)
    torch.testing.assert_close(x0_v, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_v, noise, rtol=1e-5, atol=1e-5)
    x0_e, _ = sched.predict_x0_eps("eps", noise[:2], x_t[:2], ts[:2])  # eps is undefined at alpha_bar = 0
    torch.testing.assert_close(x0_e, x0[:2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_follow_the_formula(prediction):
    gamma = 5.0
    sched = NoiseSchedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    ts = torch.tensor([0, 100, 400, 700, 998])
    w = sched.min_snr_weights(ts, prediction, gamma)
    snr = sched.alphas_cumprod[ts] / (1 - sched.alphas_cumprod[ts])
    ref = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(w, ref.float())
    # the same weights diffusers' train_text_to_image_sdxl.py computes with its compute_snr
    ddpm = _ddpm(True, "epsilon" if prediction == "eps" else "v_prediction")
    a = ddpm.alphas_cumprod[ts] ** 0.5
    s = (1 - ddpm.alphas_cumprod[ts]) ** 0.5
    snr_d = (a / s) ** 2
    ref_d = torch.stack([snr_d, gamma * torch.ones_like(snr_d)], dim=1).min(dim=1)[0]
    ref_d = ref_d / (snr_d if prediction == "eps" else snr_d + 1)
    torch.testing.assert_close(w, ref_d, rtol=1e-4, atol=1e-6)


def test_min_snr_at_terminal_step_is_finite():
    sched = NoiseSchedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    T = torch.tensor([999])
    assert sched.min_snr_weights(T, "eps", 5.0).item() == 1.0  # limit of min(snr, g)/snr as snr -> 0
    assert sched.min_snr_weights(T, "v", 5.0).item() == 0.0  # no x0 information in pure noise
    assert torch.all(sched.min_snr_weights(torch.arange(1000), "v", 0.0) == 1.0)


def test_lumina_t_matches_snr_and_orientation():
    sched = NoiseSchedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    ts = torch.arange(1000)
    t = sched.lumina_t(ts)
    assert t[-1].item() == 0.0  # ZTSNR terminal = pure noise = Lumina t 0
    assert t[0].item() > 0.9  # timestep 0 is nearly clean
    assert torch.all(t[1:] < t[:-1])
    # flow-matching SNR t^2/(1-t)^2 equals DDPM SNR alpha_bar/(1-alpha_bar)
    snr_flow = (t[:-1].double() / (1 - t[:-1].double())) ** 2
    torch.testing.assert_close(snr_flow, sched.snr(ts[:-1]), rtol=1e-5, atol=0)


def test_timestep_sampling_uniform_and_low_snr():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(DiffusionConfig(), 20000, g)
    assert u.dtype == torch.int64 and u.min() >= 0 and u.max() <= 999
    assert abs(u.float().mean().item() - 499.5) < 10
    ln = sample_timesteps(DiffusionConfig(timestep_sampling="logit_normal", logit_mean=1.0), 20000, g)
    assert ln.min() >= 0 and ln.max() <= 999
    # logit-normal with mean 1: median timestep = sigmoid(1) * 1000 ~ 731 (toward low SNR)
    assert abs(ln.float().median().item() - 1000 / (1 + math.exp(-1))) < 15


def test_noise_offset_adds_per_channel_shift_and_is_eps_only():
    cfg = DiffusionConfig(noise_offset=0.5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    like = torch.zeros(2, 4, 16, 16)
    n_off = sample_noise(cfg, like, g1)
    n_plain = sample_noise(DiffusionConfig(), like, g2)
    diff = n_off - n_plain  # the offset term: constant over (h, w), one value per (sample, channel)
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert diff.abs().max() > 0.01
    with pytest.raises(ConfigError, match="noise_offset"):
        from_dict(DiffusionConfig, {"prediction": "v", "noise_offset": 0.1}, where="x.yaml", prefix="model.objective.")
