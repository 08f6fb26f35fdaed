"""SDXL samplers against diffusers' schedulers and StableDiffusionXLPipeline on a tiny SDXL."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from lumina_illus.models.sdxl import FAMILY, SDXLConfig
from lumina_illus.objectives.diffusion import DiffusionConfig, NoiseSchedule
from lumina_illus.sampling.diffusion import (
    DiffusionSampler,
    DiffusionSamplerConfig,
    rescale_guidance,
    sampling_timesteps,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet_fn(tiny):
    """A real (tiny, random) SDXL UNet with fixed conditioning, as the model the samplers call."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny / "unet").eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])

    @torch.no_grad()
    def fn(x, t):
        t = t.reshape(-1)[:1].expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), float(t))
        return unet(x, t, encoder_hidden_states=ctx.expand(x.shape[0], -1, -1),
                    added_cond_kwargs={"text_embeds": pooled.expand(x.shape[0], -1), "time_ids": ids.expand(x.shape[0], -1)}).sample

    return fn


def _diffusers_scheduler(sampler, prediction, ztsnr, spacing):
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  prediction_type="v_prediction" if prediction == "v" else "epsilon",
                  rescale_betas_zero_snr=ztsnr, timestep_spacing=spacing, steps_offset=1)
    if sampler == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    return EulerDiscreteScheduler(**common)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_timesteps_match_diffusers(spacing):
    for n in (1, 10, 28, 50):
        ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
        ref.set_timesteps(n)
        assert torch.equal(sampling_timesteps(n, 1000, spacing), ref.timesteps)
    assert sampling_timesteps(10, 1000, "trailing")[0] == 999  # ZTSNR sampling starts at zero SNR


@pytest.mark.parametrize(
    "sampler,prediction,ztsnr,spacing",
    [("ddim", "v", True, "trailing"), ("ddim", "eps", False, "leading"), ("euler", "v", True, "trailing"),
     ("euler", "eps", False, "leading"), ("euler", "v", False, "leading")],
)
def test_sampler_matches_diffusers_scheduler(unet_fn, sampler, prediction, ztsnr, spacing):
    steps = 10
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = DiffusionSampler(
        NoiseSchedule.from_config(DiffusionConfig(prediction=prediction, zero_terminal_snr=ztsnr)),
        prediction, DiffusionSamplerConfig(sampler=sampler, spacing=spacing, steps=steps),
    )
    trace = []
    x_ours = ours.sample(unet_fn, noise, callback=trace.append)

    ref = _diffusers_scheduler(sampler, prediction, ztsnr, spacing)
    ref.set_timesteps(steps)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(unet_fn(ref.scale_model_input(x, t), t), t, x).prev_sample
    torch.testing.assert_close(x_ours, x, rtol=1e-4, atol=1e-4)
    assert len(trace) == steps and all(torch.isfinite(r["x0"]).all() for r in trace)
    if ztsnr:
        assert trace[0]["t"] == 0.0  # trailing + ZTSNR: the first step is pure noise


def test_guidance_rescale_matches_diffusers():
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    guided = uncond + 5.0 * (cond - uncond)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(rescale_guidance(guided, cond, phi), rescale_noise_cfg(guided, cond, phi))


@pytest.mark.parametrize("prediction,ztsnr,spacing,rescale", [("v", True, "trailing", 0.7), ("eps", False, "leading", 0.0)])
def test_generator_matches_stable_diffusion_xl_pipeline(tiny, prediction, ztsnr, spacing, rescale):
    """Our text conditioning + CFG + Euler reproduce diffusers' SDXL pipeline latents (short prompts)."""
    sampler_cfg = DiffusionSamplerConfig(sampler="euler", spacing=spacing, steps=6, guidance=4.0,
                                         guidance_rescale=rescale, negative_prompt="bad hands")
    m = SDXLConfig(pretrained=str(tiny), objective=DiffusionConfig(prediction=prediction, zero_terminal_snr=ztsnr),
                   sampler=sampler_cfg)
    from lumina_illus.models.sdxl import SDXLTextConditioner, load_components
    from lumina_illus.models.vae import LatentCodec
    from lumina_illus.sampling.diffusion import SDXLGenerator

    comps = load_components(tiny)
    text = SDXLTextConditioner(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2, 3)
    gen = SDXLGenerator(comps.unet.eval(), text, LatentCodec(m.vae, "cpu", vae=comps.vae),
                        NoiseSchedule.from_config(m.objective), prediction, sampler_cfg)
    prompts, size = ["the girl, red hair", "a cat"], (64, 48)  # (width, height)
    noise = torch.cat([gen._noise(s, size) for s in (0, 1)])
    ours = gen.sampler.sample(gen._model_fn(prompts, "bad hands", size, 4.0), noise)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
    pipe.scheduler = _diffusers_scheduler("euler", prediction, ztsnr, spacing)
    ref = pipe(prompts, negative_prompt=["bad hands"] * 2, height=48, width=64, num_inference_steps=6,
               guidance_scale=4.0, guidance_rescale=rescale, latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_generate_any_bucket_size_and_seeded(tiny):
    gen = FAMILY.load_generator(tiny, torch.device("cpu"), sampler=DiffusionSamplerConfig(steps=3, guidance=2.0))
    a = gen.generate(["the girl", "a cat", "the girl"], [(64, 64), (96, 32), (64, 64)], [5, 6, 5])
    assert [im.size for im in a] == [(64, 64), (96, 32), (64, 64)]
    assert a[0].tobytes() == a[2].tobytes()  # same prompt + seed -> same image
    traj = gen.trajectory("the girl", (64, 64), 5, 3, 2.0)
    assert [tuple(r["x"].shape) for r in traj] == [(4, 8, 8)] * 3
    assert 0.0 < traj[0]["t"] < traj[-1]["t"] < 1.0  # no ZTSNR here: first step is nearly but not pure noise
    with pytest.raises(ValueError, match="multiples of 8"):
        gen.generate(["x"], [(60, 64)], [0])
