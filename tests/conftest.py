"""Shared fixtures: the repository root on sys.path, a tiny random CLIP, temporary folders."""

from __future__ import annotations

import os
import sys

# One intra-op thread, here and in every process the tests start (train.py, scripts, spawned DDP ranks,
# which inherit the environment): with the tiny model, threads only contend for the CI machine's 2 cores
# (a subprocess with torch's default thread count spends about 3x the CPU time). A value set outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The checkout's plugins under their checkout names first: restore.methods.load_plugins then finds the
# same files already imported and does not import them again as restore_plugins.*.
import datasets  # noqa: E402,F401
import trainers  # noqa: E402

trainers.register_all()

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip():
    """A randomly initialised tiny CLIP (never pretrained), fixed seed, eval mode."""
    from restore.clip.model import CLIP, TINY_CONFIG

    torch.manual_seed(0)
    return CLIP(TINY_CONFIG).eval()


@pytest.fixture(autouse=True)
def _restore_stdout():
    """Tests that run train.py in-process install the log tee on sys.stdout; undo it after each test
    so pytest's own summary line still reaches the terminal."""
    original = sys.stdout
    yield
    current = sys.stdout
    if current is not original:
        close = getattr(current, "close", None)
        if close is not None and hasattr(current, "console"):
            close()
        sys.stdout = original


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate-references", action="store_true", default=False,
                     help="rewrite tests/data/reference/*.json (the frozen per-method logits) from the current "
                          "code instead of comparing against them; review the diff before committing")


@pytest.fixture
def regenerate_references(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regenerate-references"))
