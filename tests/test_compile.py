"""`model.compile: true`: each NextDiT block compiled with dynamic shapes (NextDiT.compile_blocks). Over
50 training steps of packs whose sizes change every step, the blocks compile a bounded number of graphs
(sizes 0/1 specialise, nothing else), and compiled outputs and gradients equal eager ones."""

from __future__ import annotations

import copy

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lumina_illus.models.nextdit import NextDiT, nextdit_tiny

torch.set_num_threads(1)


def random_model(seed: int) -> NextDiT:
    torch.manual_seed(seed)
    model = NextDiT(nextdit_tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def packs(steps: int, seed: int = 0):
    """(latents, t, cap_feats, cap_mask) per step: 1-4 samples, 4-12 latent px per side, 1-8 caption
    tokens; the first steps hold the specialising sizes (one sample; one-token captions)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        b = [3, 1, 2][step] if step < 3 else int(torch.randint(1, 5, (1,), generator=g))
        caps = torch.ones(b, dtype=torch.long) if step == 2 else torch.randint(1, 9, (b,), generator=g)
        sizes = (torch.randint(2, 7, (b, 2), generator=g) * 2).tolist()
        latents = [torch.randn(16, h, w, generator=g) for h, w in sizes]
        n = int(caps.max())
        feats = torch.randn(b, n, 32, generator=g)
        yield latents, torch.rand(b, generator=g), feats, torch.arange(n)[None] < caps[:, None]


def train_step(model: NextDiT, batch) -> list[torch.Tensor]:
    model.zero_grad()
    out = model(*batch)
    sum(o.square().mean() for o in out).backward()
    return [*(o.detach() for o in out), *(p.grad.clone() for p in model.parameters() if p.requires_grad)]


def test_mixed_size_steps_compile_a_bounded_number_of_graphs():
    """Dynamo's part (guards, recompiles) is the same for every torch.compile backend; "aot_eager" keeps
    it fast. With static shapes this would compile a graph per new pack (the limit is raised so that a
    fallback to eager cannot hide it)."""
    torch._dynamo.reset()
    counters.clear()
    model = random_model(0)
    eager = copy.deepcopy(model)
    model.compile_blocks(backend="aot_eager")
    graphs, shapes = [], set()
    with torch._dynamo.config.patch(recompile_limit=64):
        for batch in packs(50):
            got = train_step(model, batch)
            graphs.append(counters["stats"]["unique_graphs"])
            shapes.add(tuple(tuple(x.shape) for x in batch[0]) + (tuple(batch[3].sum(1).tolist()),))
    print(f"graphs compiled after each of 50 steps: {graphs}")
    assert len(shapes) >= 45  # packs of new sizes (almost) every step
    assert graphs[-1] <= 6  # 2 block kinds x (general, one sample, one-token captions) at most
    assert graphs[10] == graphs[-1]  # none in the last 40 steps
    assert not counters["graph_break"]
    for a, b in zip(got, train_step(eager, batch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inductor_blocks_match_eager_with_checkpointing():
    """The default backend (inductor, C++ on CPU): outputs and gradients within fp32 tolerance of eager,
    with every other block recomputed in backward, over packs of different sizes."""
    torch._dynamo.reset()
    model = random_model(1)
    eager = copy.deepcopy(model)
    model.compile_blocks()
    for m in (model, eager):
        m.set_activation_checkpointing("every_2")
    g = torch.Generator().manual_seed(2)
    for sizes, caps in (([(8, 6), (4, 10), (6, 6)], [5, 2, 7]), ([(10, 4), (6, 8)], [3, 6])):
        latents = [torch.randn(16, h, w, generator=g) for h, w in sizes]
        feats = torch.randn(len(caps), max(caps), 32, generator=g)
        mask = torch.arange(max(caps))[None] < torch.tensor(caps)[:, None]
        batch = (latents, torch.rand(len(caps), generator=g), feats, mask)
        for a, b in zip(train_step(model, batch), train_step(eager, batch)):
            assert (a - b).norm() <= 1e-4 * b.norm(), (a - b).norm() / b.norm()
    assert all(block._compiled_call_impl is not None for block in model.blocks())
    assert model.state_dict().keys() == eager.state_dict().keys()  # no "_orig_mod." in checkpoint names


def test_model_compile_switch_compiles_the_blocks_at_build(tmp_path):
    from lumina_illus.config import config_from_raw
    from lumina_illus.families import get_family
    from lumina_illus.models.tiny import make_tiny_flux_vae, make_tiny_gemma2

    model = {"arch": {"preset": "tiny"}, "text_encoder": {"path": str(make_tiny_gemma2(tmp_path / "g", ["a b"]))},
             "vae": {"path": str(make_tiny_flux_vae(tmp_path / "v"))}}
    for setting in (False, True):
        cfg = config_from_raw({"family": "lumina2", "model": {**model, "compile": setting}, "train": {"precision": "fp32"}},
                              "r.yaml")
        dit = get_family("lumina2").build_training(cfg, torch.device("cpu")).module.dit
        assert [b._compiled_call_impl is not None for b in dit.blocks()] == [setting] * 4
