import os
from pathlib import Path

# No model hub in tests: an open_clip tag must fail fast with our error, never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: threads only add synchronisation (and thrash on a shared 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from latent_verbalizer.services.decoder import grounding  # noqa: E402
from latent_verbalizer.services.encoder.stage import encode_grounded  # noqa: E402
from latent_verbalizer.services.families import Family, load_family  # noqa: E402
from latent_verbalizer.shared.schemas import DecodeParams  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny() -> Family:
    """coca_tiny with random weights from the fixed seed."""
    return load_family("coca_tiny")


@pytest.fixture(scope="session")
def pixels(tiny) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g)


@pytest.fixture(scope="session")
def trained_like() -> Family:
    """coca_tiny with random scales and shifts in every norm and random biases, as trained weights have
    them: random init leaves norms at 1 and 0 and biases at 0, which would hide a mistake in how the
    cached decoder folds the image-side norm and projections into its cross-attention, or in how
    the encoder's and decoder's own block code applies biases."""
    lm = load_family("coca_tiny")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in lm.model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
        for name, p in lm.model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return lm


@pytest.fixture()
def photos(tmp_path) -> Path:
    """A folder of three small PNGs (p0, p1, p2): a user's input folder for the commands' tests."""
    from service_stack import image_bytes

    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        (d / f"p{i}.png").write_bytes(image_bytes(i))
    return d


class GrayGrounded(NamedTuple):
    images: torch.Tensor  # [4, 3, H, W]: three test images, then the gray null image
    latents: torch.Tensor  # [L, 4, N, D]
    embeddings: torch.Tensor  # [4, E]
    grounded: grounding.Grounded  # every image's captions with their grounding


@pytest.fixture()
def gray_grounded(pixels):
    """(family, layers, params) -> GrayGrounded: three test images and the gray null image (the last image IS the
    null input) captioned at `layers` with grounding, as a fresh process does it (no null captions kept)."""

    def run(lm: Family, layers: list[int], params: DecodeParams) -> GrayGrounded:
        grounding.forget_null_captions(lm.model)
        images = torch.cat([pixels[:3], lm.null_pixels()])
        latents, embeddings = encode_grounded(lm.model.visual, images, layers)
        g = grounding.caption_grounded(lm, latents, embeddings, latents[:, 3:], layers, ["a", "b", "c", "gray"],
                                       params)
        return GrayGrounded(images, latents, embeddings, g)

    return run
