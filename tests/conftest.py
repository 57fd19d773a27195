import os

# No model hub in tests: an open_clip tag must fail fast with our error, never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: threads only add synchronisation (and thrash on a shared 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from shared.models import LoadedModel, load_model  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """coca_tiny with random weights from the fixed seed."""
    return load_model("coca_tiny")


@pytest.fixture(scope="session")
def pixels(tiny) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g)
