"""Shared fixtures: the repository root on sys.path, a tiny random CLIP, temporary folders."""

from __future__ import annotations

import os
import sys

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

# One thread: on the 2-core CI machine, subprocess runs and intra-op threads otherwise oversubscribe.
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
