import os

# Installed third-party plugins must not change test outcomes: load no entry points unless a
# test asks for them explicitly.
os.environ.setdefault("PRUNEBENCH_LOAD_PLUGINS", "")
# Every engine diagnoses every keep-set in full (prunebench.engine.debug_checks).
os.environ.setdefault("PRUNEBENCH_DEBUG_CHECKS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from prunebench.engine import PruningEngine  # noqa: E402
from prunebench.interface import Observation  # noqa: E402
from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig  # noqa: E402

TINY = MiniOFTConfig(image_size=32, patch_size=8, stem_channels=4, vision_width=8, hidden_size=32,
                     n_layers=4, n_heads=2, intermediate_size=64, head_hidden=32)


def make_observation(seed: int = 0, size: int = 32, instruction: str = "pick up the ketchup and place it in the basket"):
    rng = np.random.default_rng(seed)
    images = {v: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for v in ("agentview", "wrist")}
    return Observation(images, rng.normal(size=8).astype(np.float32), instruction)


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return MiniOFT.random(TINY, seed=0)


@pytest.fixture
def engine(tiny_model):
    return PruningEngine(tiny_model, record_kept=True)


@pytest.fixture
def obs():
    return make_observation()
