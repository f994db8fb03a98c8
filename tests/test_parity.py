"""Same seed, same run: our trainers reproduce the official code's recorded runs (tests/data/parity/*.json).

Each fixture was written by ``python -m restore.parity ... --fixture`` from the method's official
checkout run on this engine: per-batch losses (full precision) and, per learned tensor, shape,
sum, norm and its first / last 8 values after 2 epochs. The official code is not needed here: our
trainer runs in this process on the same data (a synthetic DTD, 4 classes x 12 images, seed 0),
the same parity CLIP (:func:`restore.official.write_parity_clip`, seed 0) and the same options,
and must give the same losses and tensors to fp32 round-off.
"""

from __future__ import annotations

import glob
import json
import os.path as osp

import pytest

from helpers import run_train_py

FIXTURES = sorted(glob.glob(osp.join(osp.dirname(__file__), "data", "parity", "*.json")))
LOSS_ATOL = 1e-5


def _runs() -> list[tuple[str, str]]:
    return [(path, mode) for path in FIXTURES for mode in json.load(open(path))["runs"]]


@pytest.fixture(scope="module")
def parity_env(tmp_path_factory):
    from restore.data.synthetic import make_synthetic
    from restore.official import write_parity_clip

    base = tmp_path_factory.mktemp("parity")
    make_synthetic("dtd", str(base / "data"), num_classes=4, images_per_class=12, seed=0)
    weights = write_parity_clip(str(base / "parity_clip.pt"))
    return base, weights


def _run_ours(base, weights, fixture: dict, mode: str, tmp_path) -> tuple[list[dict], dict]:
    from restore.official import record_losses
    from restore.parity import RunKilled, common_opts, find_official_run, killed_after_epoch, learned_state, our_argv

    run = find_official_run(fixture["trainer"], variant=fixture.get("variant", ""))
    s = fixture["settings"]
    out = str(tmp_path / mode)
    common = common_opts(s["seed"], str(base / "data"), out, s["epochs"], s["shots"], s["batch"], s["resolution"],
                         best_val=mode == "best-val")
    argv = our_argv(run, common, weights, s["opts"])
    losses: list[dict] = []
    if mode == "resume":  # killed after epoch 1 (its checkpoint written), then the same command resumes
        with record_losses(None) as records, pytest.raises(RunKilled), killed_after_epoch(1):
            run_train_py(argv)
        losses += records
    with record_losses(None) as records:
        assert run_train_py(argv) == 0
    losses += records
    return losses, learned_state(out, run, s["epochs"], best=mode == "best-val")


@pytest.mark.parametrize("path,mode", _runs(), ids=lambda v: osp.basename(v).removesuffix(".json") if "/" in str(v) else v)
def test_same_losses_and_tensors_as_the_official_run(parity_env, path, mode, tmp_path):
    from restore.parity import RTOL, summarise, summary_matches

    fixture = json.load(open(path))
    recorded = fixture["runs"][mode]
    losses, state = _run_ours(*parity_env, fixture, mode, tmp_path)
    ours = [(r["epoch"], r["batch"], r["loss"]) for r in losses]
    assert [(e, b) for e, b, _ in ours] == [(e, b) for e, b, _ in recorded["losses"]]
    worst = max(abs(a[2] - b[2]) for a, b in zip(ours, recorded["losses"]))
    assert worst <= LOSS_ATOL, f"per-batch losses differ by up to {worst:.2e}"
    assert set(recorded["tensors"]) <= set(state), sorted(set(recorded["tensors"]) - set(state))
    diffs = {key: summary_matches(summarise(state[key]), summary) for key, summary in recorded["tensors"].items()}
    bad = {k: v for k, v in diffs.items() if not v <= RTOL}
    assert not bad, f"learned tensors differ from the official run beyond round-off: {bad}"
