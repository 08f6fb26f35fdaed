"""Flow sampler: schedule vs diffusers' scheduler, solver accuracy on a Gaussian flow with a known
transport map, Lumina's CFG renormalisation, and image parity with diffusers' Lumina2Pipeline built
from our exported transformer, tiny Gemma-2 and tiny Flux VAE."""

import numpy as np
import pytest
import torch

from lumina_illus.models.checkpoint_io import save_nextdit
from lumina_illus.models.nextdit import NextDiT, nextdit_tiny
from lumina_illus.models.text_encoder import (
    LUMINA_SYSTEM_PROMPT,
    GemmaTextEncoder,
    TextEncoderConfig,
    build_prompt,
)
from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2
from lumina_illus.models.vae import LatentCodec, VAEConfig
from lumina_illus.sampling.flow import (
    FlowSampler,
    FlowSamplerConfig,
    LuminaGenerator,
    guided_velocity,
    sampling_times,
)

torch.set_num_threads(1)

PROMPTS = ["1girl, red hair, smile", "a cat sitting on a chair"]


def test_sampling_times_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps, shift in ((30, 6.0), (7, 1.0), (4, 3.0)):
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).numpy())
        ours = 1 - sampling_times(steps, shift)  # sigma = 1 - t
        assert torch.allclose(sched.sigmas.double(), ours, atol=1e-6)


def _gaussian_velocity(mu: float, s: float):
    """Optimal velocity for data N(mu, s^2) and noise N(0, 1); its flow maps x0 to mu + s * x0."""

    def v(x: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for xi, ti in zip(x, t.double()):
            cov, var = ti * s**2 - (1 - ti), ti**2 * s**2 + (1 - ti) ** 2
            out.append(mu + cov / var * (xi - ti * mu))
        return out

    return v


@pytest.mark.parametrize("solver,steps,tol", [("euler", 200, 2e-2), ("midpoint", 50, 1e-3)])
def test_solvers_transport_gaussian_noise_to_data(solver, steps, tol):
    mu, s = 0.8, 0.3
    x0 = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = FlowSamplerConfig(solver=solver, steps=steps, shift=3.0)
    x1 = FlowSampler(cfg).sample(_gaussian_velocity(mu, s), [x0])[0]
    assert (x1.double() - (mu + s * x0)).abs().max() < tol


def test_midpoint_is_second_order():
    mu, s = 0.8, 0.3
    x0 = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + s * x0

    def err(solver: str, steps: int) -> float:
        x1 = FlowSampler(FlowSamplerConfig(solver=solver, steps=steps, shift=1.0)).sample(_gaussian_velocity(mu, s), [x0])
        return (x1[0].double() - exact).abs().max().item()

    # halving h cuts the error at least 4x (second order; this linear field even gives ~8x)
    assert err("midpoint", 10) / err("midpoint", 20) > 3.5
    assert 1.5 < err("euler", 10) / err("euler", 20) < 2.5  # ... and halves Euler's


def _official_renorm(cond: torch.Tensor, uncond: torch.Tensor, scale: float, renorm: float) -> torch.Tensor:
    """Lumina-Image-2.0 NextDiT.forward_with_cfg, for a batch of one (C, H, W) sample."""
    half = uncond[None] + scale * (cond[None] - uncond[None])
    ori = torch.linalg.vector_norm(cond[None], dim=(1, 2, 3), keepdim=True)
    new = torch.linalg.vector_norm(half, dim=(1, 2, 3), keepdim=True)
    if new >= ori * renorm:
        half = half * (ori * renorm / new)
    return half[0]


def test_cfg_renormalisation_matches_official_formula():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(16, 4, 6, generator=g), torch.randn(16, 4, 6, generator=g)
    for scale, renorm in ((4.0, 1.0), (4.0, 2.5), (1.5, 100.0)):
        ours = guided_velocity(cond, uncond, scale, renorm)
        assert torch.allclose(ours, _official_renorm(cond, uncond, scale, renorm), atol=1e-6)
        assert torch.linalg.vector_norm(ours) <= renorm * torch.linalg.vector_norm(cond) + 1e-4
    assert torch.allclose(guided_velocity(cond, uncond, 4.0, 0.0), uncond + 4.0 * (cond - uncond))


# ---------------------------------------------------------------------------------------------
# tiny end-to-end components


def _randomize(model: NextDiT, seed: int = 0) -> NextDiT:
    """Give the zero-initialised projections (adaLN, final layer) random values: a zero model outputs 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    gemma = make_tiny_gemma2(root / "gemma", vocab_corpus=PROMPTS)
    vae = make_tiny_flux_vae(root / "vae")
    torch.manual_seed(0)
    dit = _randomize(NextDiT(nextdit_tiny()))
    save_nextdit(dit, root / "transformer", layout="diffusers")
    te = GemmaTextEncoder(TextEncoderConfig(path=str(gemma)))
    codec = LatentCodec(VAEConfig(path=str(vae)))
    return {"root": root, "gemma": gemma, "vae": vae, "dit": dit, "te": te, "codec": codec}


def _generator(parts, **cfg) -> LuminaGenerator:
    return LuminaGenerator(parts["dit"], parts["te"], parts["codec"], FlowSamplerConfig(**cfg))


def _pipeline(parts, shift: float):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        Lumina2Pipeline,
        Lumina2Transformer2DModel,
    )
    from transformers import AutoModel, AutoTokenizer

    return Lumina2Pipeline(
        transformer=Lumina2Transformer2DModel.from_pretrained(parts["root"] / "transformer").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),  # fixed shift (see DESIGN.md on mu)
        vae=AutoencoderKL.from_pretrained(parts["vae"]),
        text_encoder=AutoModel.from_pretrained(parts["gemma"]),
        tokenizer=AutoTokenizer.from_pretrained(parts["gemma"]),
    )


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_images_match_diffusers_lumina2_pipeline(parts, guidance):
    steps, shift = 4, 6.0
    gen = _generator(parts, steps=steps, shift=shift, guidance=guidance, renorm_cfg=0.0)
    pipe = _pipeline(parts, shift)
    sizes = [(32, 48), (48, 32)]  # (width, height): different sizes sampled in one packed batch
    noise = [gen.initial_noise(size, seed) for size, seed in zip(sizes, (3, 4))]
    ours = gen.sample_latents(PROMPTS, noise)
    images = parts["codec"].decode(ours)
    for i, (w, h) in enumerate(sizes):  # diffusers: one size per call
        kwargs = dict(
            prompt=PROMPTS[i],
            negative_prompt=build_prompt("", LUMINA_SYSTEM_PROMPT),  # ours templates the negative too
            width=w,
            height=h,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise[i][None].clone(),
            cfg_normalization=False,
            cfg_trunc_ratio=1.0,
        )
        ref_latents = pipe(**kwargs, output_type="latent").images[0]
        assert torch.allclose(ours[i], ref_latents, atol=1e-4), (ours[i] - ref_latents).abs().max()
        ref_image = pipe(**kwargs, output_type="pt").images[0]  # (3, H, W) in [0, 1]
        assert torch.allclose((images[i] + 1) / 2, ref_image, atol=1e-4)
    for x, n in zip(ours, noise):  # the model really moved the latents (a zero model would pass trivially)
        assert (x - n).abs().mean() > 0.1


def test_guidance_changes_the_image_and_truncation_turns_it_off(parts):
    noise = [_generator(parts).initial_noise((32, 32), 0)]
    plain = _generator(parts, steps=3, guidance=1.0).sample_latents(PROMPTS[:1], noise)[0]
    guided = _generator(parts, steps=3, guidance=4.0).sample_latents(PROMPTS[:1], noise)[0]
    truncated = _generator(parts, steps=3, guidance=4.0, cfg_trunc=0.0).sample_latents(PROMPTS[:1], noise)[0]
    assert not torch.allclose(plain, guided, atol=1e-4)
    assert torch.equal(plain, truncated)
    negative = _generator(parts, steps=3, guidance=4.0, negative_prompt="blue eyes")
    assert not torch.allclose(negative.sample_latents(PROMPTS[:1], noise)[0], guided, atol=1e-4)


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).int()


def test_seeds_are_reproducible_and_independent_of_the_batch(parts):
    gen = _generator(parts, steps=2, batch_size=4)
    alone = gen.generate(PROMPTS[:1], [(32, 32)], [7])[0]
    batched = gen.generate(PROMPTS, [(32, 32), (64, 48)], [7, 8])
    assert batched[1].size == (64, 48)
    a, b = _pixels(alone), _pixels(batched[0])
    assert (a - b).abs().max() <= 1  # same seed, same image (up to rounding) whatever else is in the batch
    other = _pixels(gen.generate(PROMPTS[:1], [(32, 32)], [9])[0])
    assert (a - other).abs().max() > 10
    with pytest.raises(ValueError, match="multiples of 16"):
        gen.generate(PROMPTS[:1], [(40, 32)], [0])


def test_trajectory_ends_at_the_sample_and_predicts_x0(parts):
    gen = _generator(parts, guidance=4.0)
    traj = gen.trajectory(PROMPTS[0], (32, 32), 5, steps=3, guidance=4.0)
    final = gen.sample_latents(PROMPTS[:1], [gen.initial_noise((32, 32), 5)], steps=3, guidance=4.0)[0]
    assert [round(s["t"], 6) for s in traj] == [round(float(t), 6) for t in sampling_times(3, 6.0)]
    assert torch.equal(traj[0]["x"], gen.initial_noise((32, 32), 5))
    assert torch.allclose(traj[-1]["x"], final)
    # one Euler step from t_i with the model's velocity lands where x0-prediction says: x_{i+1} = x_i + h v
    t0, t1 = traj[0]["t"], traj[1]["t"]
    v = (traj[0]["x0"] - traj[0]["x"]) / (1 - t0)
    assert torch.allclose(traj[1]["x"], traj[0]["x"] + (t1 - t0) * v, atol=1e-5)
    assert gen.decode(final).size == (32, 32)


def test_bf16_model_samples_close_to_fp32(parts):
    import copy

    noise = [_generator(parts).initial_noise((32, 32), 0)]
    full = _generator(parts, steps=3).sample_latents(PROMPTS[:1], noise)[0]
    half = LuminaGenerator(copy.deepcopy(parts["dit"]).to(torch.bfloat16), parts["te"], parts["codec"],
                           FlowSamplerConfig(steps=3))
    lat = half.sample_latents(PROMPTS[:1], noise)[0]
    assert lat.dtype == torch.float32
    assert (lat - full).abs().max() < 0.05 * full.abs().max()
