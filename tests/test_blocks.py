"""The block view both stages run open_clip's weights through (shared/blocks.py)."""

import pytest
import torch
from open_clip.transformer import CustomResidualAttentionBlock

from latent_verbalizer.shared.blocks import Block, Linear, can_reorder


@pytest.mark.skipif(not can_reorder(torch.zeros(1)), reason="needs an x86 CPU and a PyTorch built with oneDNN")
def test_reordered_products_match_linear_and_do_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(96, 64, generator=g), torch.randn(96, generator=g), torch.randn(300, 1, 64, generator=g)
    lin = Linear(w, b)
    assert lin.reordered is not None
    together = lin(x)  # [300, 1, 96]
    assert torch.allclose(together, torch.nn.functional.linear(x, w, b), atol=1e-5)
    for rows in (1, 7, 8, 16, 17, 64, 256):  # a row's result is the same bit for bit in any batch
        assert torch.equal(lin(x[-rows:]), together[-rows:])


def test_other_block_types_are_refused_by_name():
    with pytest.raises(ValueError, match="CustomResidualAttentionBlock"):
        Block.of(CustomResidualAttentionBlock(16, 2))
