"""Analytic NextDiT FLOPs against torch.utils.flop_counter on real forward passes."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lumina_illus.models.nextdit import NextDiT, nextdit_2b, nextdit_tiny

torch.set_num_threads(1)


@pytest.mark.parametrize("hw,cap_len", [((16, 16), 12), ((8, 24), 40), ((32, 32), 1)])
def test_analytic_flops_match_flop_counter(hw: tuple[int, int], cap_len: int) -> None:
    model = NextDiT(nextdit_tiny())
    h, w = hw
    img_tokens = (h // 2) * (w // 2)
    x = torch.randn(1, 16, h, w)
    feats, mask = torch.randn(1, cap_len, 32), torch.ones(1, cap_len, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into matmuls the counter sees on CPU
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x, torch.tensor([0.5]), feats, mask)
    measured = counter.get_total_flops()
    analytic = model.flops(img_tokens, cap_len)
    assert measured > 0
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)


def test_2b_flops_at_1024px() -> None:
    """4096 image tokens + 256 caption tokens, written out by hand: 2 FLOPs per weight per token of
    each block (refiners see only their own tokens) plus 4 * seq^2 * dim of attention: ~23.8 TFLOP."""
    with torch.device("meta"):
        model = NextDiT(nextdit_2b())
    f = model.flops(4096, 256)
    block_params = 2304 * (24 + 16) * 96 + 24 * 96 * 2304 + 3 * 2304 * 9216
    matmul = 2 * block_params * (26 * 4352 + 2 * 4096 + 2 * 256)
    attention = 4 * 24 * 96 * (26 * 4352**2 + 2 * 4096**2 + 2 * 256**2)
    assert f == pytest.approx(matmul + attention, rel=0.01)
    assert 2.3e13 < f < 2.45e13
