"""Flow-matching objective: targets against a Gaussian with a closed-form optimal velocity, the
resolution shift against diffusers' Flux formula, timestep distributions, packed-batch reduction."""

import math

import pytest
import torch

from lumina_illus.config import ConfigError, from_dict
from lumina_illus.objectives.flow_matching import FlowMatching, FlowMatchingConfig, time_shift

torch.set_num_threads(1)


def _optimal_velocity(x: torch.Tensor, t: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """E[x1 - x0 | x_t = x] for x1 ~ N(mu, s^2), x0 ~ N(0, 1), x_t = t x1 + (1 - t) x0 (jointly Gaussian)."""
    cov = t * s**2 - (1 - t)  # Cov(x1 - x0, x_t)
    var = t**2 * s**2 + (1 - t) ** 2  # Var(x_t)
    return mu + cov / var * (x - t * mu)


def _min_loss(t: torch.Tensor, s: float) -> torch.Tensor:
    """Var(x1 - x0 | x_t): the irreducible MSE of the optimal predictor at time t."""
    cov = t * s**2 - (1 - t)
    var = t**2 * s**2 + (1 - t) ** 2
    return (s**2 + 1) - cov**2 / var


def test_gaussian_data_optimal_velocity_reaches_closed_form_minimum():
    g = torch.Generator().manual_seed(0)
    mu, s = 1.5, 0.5
    fm = FlowMatching(FlowMatchingConfig(timestep="uniform", shift="none"))
    x1 = [mu + s * torch.randn(1, 32, 32, generator=g) for _ in range(100)]  # 100 samples of 1024 values
    t = fm.sample_t([64] * len(x1), g)
    x0 = fm.sample_noise(x1, g)
    xt = fm.noisy_input(x1, x0, t)
    target = fm.target(x1, x0)
    best = [_optimal_velocity(x, ti, mu, s) for x, ti in zip(xt, t)]
    loss, per_sample = fm.loss(best, target)
    expected = _min_loss(t, s)  # (B,)
    # Monte-Carlo over 102400 values: the mean matches to ~1%
    assert loss.item() == pytest.approx(expected.mean().item(), rel=0.02)
    assert torch.allclose(per_sample, expected, rtol=0.2)  # ~4.5 sigma of a 1024-value mean
    # any other predictor is worse: the optimum really is the minimiser of this loss
    for other in ([b + 0.1 for b in best], [b * 0.9 for b in best], [torch.zeros_like(b) for b in best]):
        assert fm.loss(other, target)[0] > loss


def test_regression_at_fixed_t_recovers_optimal_linear_field():
    """Least squares of the target on x_t at one t gives the closed-form slope and intercept."""
    g = torch.Generator().manual_seed(1)
    mu, s, t0 = -0.7, 2.0, 0.3
    fm = FlowMatching()
    x1 = [mu + s * torch.randn(20000, generator=g)]
    x0 = fm.sample_noise(x1, g)
    t = torch.tensor([t0])
    x = fm.noisy_input(x1, x0, t)[0]
    v = fm.target(x1, x0)[0]
    a = torch.stack([x, torch.ones_like(x)], 1)  # (N, 2)
    slope, icpt = torch.linalg.lstsq(a, v[:, None]).solution[:, 0]
    cov, var = t0 * s**2 - (1 - t0), t0**2 * s**2 + (1 - t0) ** 2
    assert slope.item() == pytest.approx(cov / var, abs=0.02)
    assert icpt.item() == pytest.approx(mu - cov / var * t0 * mu, abs=0.03)


def test_noisy_input_endpoints_follow_lumina_convention():
    fm = FlowMatching()
    x1, x0 = [torch.ones(2, 2, 2)], [torch.zeros(2, 2, 2)]
    assert torch.equal(fm.noisy_input(x1, x0, torch.tensor([1.0]))[0], x1[0])  # t = 1: data
    assert torch.equal(fm.noisy_input(x1, x0, torch.tensor([0.0]))[0], x0[0])  # t = 0: noise


def test_resolution_shift_matches_diffusers_flux_formula_per_sample():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = [256, 1024, 4096, 8192]
    fm = FlowMatching(FlowMatchingConfig(timestep="uniform", shift="resolution"))
    t = fm.sample_t(tokens, torch.Generator().manual_seed(3))
    u = torch.rand(4, generator=torch.Generator().manual_seed(3))  # the same base draws
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    for i, n in enumerate(tokens):
        mu = calculate_shift(n, 256, 4096, 0.5, 1.15)
        sigma = sched.time_shift(mu, 1.0, 1 - u[i : i + 1])  # diffusers: sigma = 1 - t
        assert t[i].item() == pytest.approx(1 - sigma.item(), abs=1e-6)
    # bigger images get noisier times for the same draw
    base = torch.full((4,), 0.5)
    shifted = time_shift(base, torch.exp(torch.tensor([0.5, 1.15])).repeat(2))
    assert shifted[1] < shifted[0] < 0.5


def test_fixed_shift_matches_scheduler_static_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=6.0)
    sigmas = torch.linspace(1.0, 0.05, 20)
    expected = 6.0 * sigmas / (1 + 5.0 * sigmas)  # diffusers' static shift, in sigma = 1 - t
    sched.set_timesteps(sigmas=sigmas.numpy())
    assert torch.allclose(sched.sigmas[:-1], expected, atol=1e-6)
    assert torch.allclose(1 - time_shift(1 - sigmas, 6.0), expected, atol=1e-6)


def test_logit_normal_quantiles():
    fm = FlowMatching(FlowMatchingConfig(timestep="logit_normal", logit_mean=0.5, logit_std=1.2, shift="none"))
    t = fm.sample_t([256] * 40000, torch.Generator().manual_seed(4))
    for q, z in ((0.1, -1.2815516), (0.5, 0.0), (0.9, 1.2815516)):
        expected = 1 / (1 + math.exp(-(0.5 + 1.2 * z)))
        assert torch.quantile(t, q).item() == pytest.approx(expected, abs=0.01)
    assert 0 < t.min() and t.max() < 1


def test_sample_vs_token_reduction_over_mixed_sizes():
    pred = [torch.zeros(1, 2, 2), torch.zeros(1, 4, 4)]
    target = [torch.ones(1, 2, 2), torch.full((1, 4, 4), 2.0)]
    loss_s, per_sample = FlowMatching(FlowMatchingConfig(reduction="sample")).loss(pred, target)
    loss_t, _ = FlowMatching(FlowMatchingConfig(reduction="token")).loss(pred, target)
    assert per_sample.tolist() == [1.0, 4.0]
    assert loss_s.item() == pytest.approx(2.5)  # (1 + 4) / 2: each sample counts once
    assert loss_t.item() == pytest.approx((4 * 1 + 16 * 4) / 20)  # each element counts once
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        FlowMatching().loss(pred, target[:1])


def test_loss_gradient_flows_and_per_sample_is_detached():
    p = [torch.zeros(1, 2, 2, requires_grad=True)]
    loss, per_sample = FlowMatching().loss(p, [torch.ones(1, 2, 2)])
    loss.backward()
    assert torch.allclose(p[0].grad, torch.full((1, 2, 2), -0.5))  # d/dp mean((p-1)^2) = 2(p-1)/4
    assert not per_sample.requires_grad


def test_t_bin_losses():
    fm = FlowMatching()
    bins = fm.t_bin_losses(torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([0.05, 0.07, 0.55, 1.0]))
    assert bins == {"loss_t/0.0-0.1": 2.0, "loss_t/0.5-0.6": 5.0, "loss_t/0.9-1.0": 7.0}


def test_config_errors_name_file_and_key():
    with pytest.raises(ConfigError, match=r"run\.yaml.*model\.objective.*shift"):
        from_dict(FlowMatchingConfig, {"shift": "huge"}, where="run.yaml", prefix="model.objective.")
    assert from_dict(FlowMatchingConfig, {"shift": 3}).shift == 3.0
    with pytest.raises(ConfigError, match="logit_std"):
        from_dict(FlowMatchingConfig, {"logit_std": 0}, where="run.yaml")
