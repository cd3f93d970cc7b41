import os

# Installed third-party plugins must not change test outcomes: load no entry points unless a
# test asks for them explicitly.
os.environ.setdefault("PRUNEBENCH_LOAD_PLUGINS", "")
# Every engine diagnoses every keep-set in full (prunebench.engine.loop.debug_checks).
os.environ.setdefault("PRUNEBENCH_DEBUG_CHECKS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from prunebench.contract.strategy import Observation  # noqa: E402
from prunebench.engine.loop import PruningEngine  # noqa: E402
from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig  # noqa: E402

TINY = MiniOFTConfig(image_size=32, patch_size=8, stem_channels=4, vision_width=8, hidden_size=32,
                     n_layers=4, n_heads=2, intermediate_size=64, head_hidden=32)


def make_observation(seed: int = 0, size: int = 32,
                     instruction: str = "pick up the ketchup and place it in the basket"):
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


@pytest.fixture
def tiny_path(tmp_path, tiny_model):
    """The tiny model saved as a MiniOFT file, for commands and runs that take ``--model``."""
    path = tmp_path / "tiny.safetensors"
    tiny_model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's postgresql package, installed by .ci/run)."""
    import glob
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"))), None)
    if bindir is None and shutil.which("initdb"):
        bindir = os.path.dirname(shutil.which("initdb"))
    if bindir is None:
        if os.environ.get("PRUNEBENCH_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed")
    root = tempfile.mkdtemp(prefix="prunebench-pg-")
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(root, "data")
    subprocess.run(as_user + [f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
                              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
