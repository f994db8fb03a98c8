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
import torch

from helpers import run_train_py

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

FIXTURES = sorted(glob.glob(osp.join(osp.dirname(__file__), "data", "parity", "*.json")))
LOSS_ATOL = 1e-5


def _runs() -> list[tuple[str, str]]:
    return [(path, mode) for path in FIXTURES for mode in json.load(open(path))["runs"]]


@pytest.fixture(scope="module")
def parity_env(tmp_path_factory):
    from restore.datasets.synthetic import make_synthetic
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


def _eval_ours(base, weights, fixture: dict, tmp_path) -> list[list[float]]:
    from restore.official import record_logits
    from restore.parity import common_opts, find_official_run, our_argv

    run = find_official_run(fixture["trainer"], variant=fixture.get("variant", ""))
    s = fixture["settings"]
    common = common_opts(s["seed"], str(base / "data"), str(tmp_path / "eval"), s["epochs"], s["shots"], s["batch"],
                         s["resolution"])
    with record_logits(None) as rows:
        assert run_train_py(["--eval-only", *our_argv(run, common, weights, s["opts"])]) == 0
    return rows


@pytest.mark.parametrize("path,mode", _runs(), ids=lambda v: osp.basename(v).removesuffix(".json") if "/" in str(v) else v)
def test_same_losses_and_tensors_as_the_official_run(parity_env, path, mode, tmp_path):
    from restore.parity import RTOL, summarise, summary_matches

    fixture = json.load(open(path))
    recorded = fixture["runs"][mode]
    if mode == "eval":  # evaluation only (zero-shot CLIP): the same test outputs
        rows = _eval_ours(*parity_env, fixture, tmp_path)
        from restore.parity import logits_difference

        assert len(rows) == len(recorded["logits"])
        assert logits_difference(rows, recorded["logits"]) <= RTOL
        return
    losses, state = _run_ours(*parity_env, fixture, mode, tmp_path)
    ours = [(r["epoch"], r["batch"], r["loss"]) for r in losses]
    assert [(e, b) for e, b, _ in ours] == [(e, b) for e, b, _ in recorded["losses"]]
    worst = max(abs(a[2] - b[2]) for a, b in zip(ours, recorded["losses"]))
    assert worst <= LOSS_ATOL, f"per-batch losses differ by up to {worst:.2e}"
    assert set(recorded["tensors"]) <= set(state), sorted(set(recorded["tensors"]) - set(state))
    diffs = {key: summary_matches(summarise(state[key]), summary) for key, summary in recorded["tensors"].items()}
    bad = {k: v for k, v in diffs.items() if not v <= RTOL}
    assert not bad, f"learned tensors differ from the official run beyond round-off: {bad}"


def test_loading_clip_draws_nothing_and_replay_draws_like_openai_build(tmp_path):
    """Loading a weights file leaves the global RNG alone; the replay advances it exactly as building
    the same architecture with OpenAI's construction order (default initialisers, then
    ``initialize_parameters`` on the text tower only) does."""
    from torch import nn

    from restore.clip import load_clip
    from restore.clip.loader import clear_cache, save_openai_state_dict
    from restore.clip.model import CLIP, TINY_CONFIG
    from restore.clip.replay import replay_openai_build

    path = str(tmp_path / "tiny.pt")
    save_openai_state_dict(CLIP(TINY_CONFIG), path)
    clear_cache()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    config = load_clip(path).model.config
    assert torch.equal(torch.get_rng_state(), before)

    torch.manual_seed(5)
    replay_openai_build(config)
    replayed = torch.rand(3)
    torch.manual_seed(5)  # OpenAI's order, spelled out: the ViT, the text tower, then its initialisation
    w, t = config.vision_width, config.transformer_width
    nn.Conv2d(3, w, config.vision_patch_size, config.vision_patch_size, bias=False)
    torch.randn(w), torch.randn((config.image_resolution // config.vision_patch_size) ** 2 + 1, w)
    for width, layers in ((w, config.vision_layers), (t, config.transformer_layers)):
        if width == t:
            torch.randn(w, config.embed_dim)  # visual.proj, after the vision blocks
        for _ in range(layers):
            nn.MultiheadAttention(width, 1), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
    emb = nn.Embedding(config.vocab_size, t)
    nn.init.normal_(emb.weight, std=0.02), nn.init.normal_(torch.empty(config.context_length, t), std=0.01)
    for _ in range(config.transformer_layers):
        for shape in ((3 * t, t), (t, t), (4 * t, t), (t, 4 * t)):
            nn.init.normal_(torch.empty(shape))
    nn.init.normal_(torch.empty(t, config.embed_dim))
    assert torch.equal(replayed, torch.rand(3))


def test_shuffling_draws_from_the_global_rng_like_dassl(tmp_path):
    """Same seed, same batches as Dassl's loader (a RandomSampler without a generator)."""
    from torch.utils.data import DataLoader, RandomSampler

    from restore.engine.config import get_cfg_default
    from restore.engine.data.data_manager import build_data_loader
    from restore.engine.data.datum import Datum

    cfg = get_cfg_default()
    cfg.DATALOADER.NUM_WORKERS = 0
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    items = [Datum(impath=str(tmp_path / f"{i}.jpg"), label=i % 3) for i in range(10)]
    torch.manual_seed(1)
    ours = build_data_loader(cfg, "RandomSampler", items, batch_size=4, is_train=True)
    order = [list(iter(ours.batch_sampler)) for _ in range(2)]
    torch.manual_seed(1)
    dassl = DataLoader(list(range(10)), batch_size=4, sampler=RandomSampler(list(range(10))), drop_last=True)
    expected = [list(iter(dassl.batch_sampler)) for _ in range(2)]
    assert order == expected and order[0] != order[1]


def test_tensor_comparison_reports_the_worst_element_and_the_normwise_difference():
    """One element off by 5e-5 of the tensor's largest value (what AdamW makes of a round-off-level
    gradient: a step of up to ~lr, see docs/parity.md): the max-element metric shows it, the
    normwise one (||a - b|| / ||b||) barely; the tool prints both. ``--noise-floor`` is a flag."""
    from restore.parity import RTOL, build_parser, compare_tensors

    official = torch.linspace(-1.0, 1.0, 10_000)
    ours = official.clone()
    ours[1234] += 5e-5
    [(key, rel, rel_l2)] = compare_tensors({"w": ours}, {"w": official})
    assert key == "w" and rel > RTOL and rel_l2 < RTOL
    assert abs(rel - 5e-5) < 1e-7 and abs(rel_l2 - 5e-5 / float(official.norm())) < 1e-8
    assert compare_tensors({}, {"w": official}) == [("w", float("inf"), float("inf"))]
    assert build_parser().parse_args(["--noise-floor"]).noise_floor


def test_bad_command_lines_are_one_sentence_each(tmp_path, capsys):
    from restore.parity import main

    good = _runnable_argv(tmp_path, "CoOp")
    cases = {
        "--official": (["--official", str(tmp_path / "missing")], "is not a folder"),
        "--weights": (["--weights", str(tmp_path / "none.pt")], "--write-clip"),
        "--root": (["--root", str(tmp_path / "official")], "holds no dtd/images"),
        "--trainer": (["--trainer", "CoOq"], "registered: CoCoOp, CoOp,"),
        "--variant": (["--variant", "nope"], "declares no official variant 'nope'"),
    }
    for flag, (change, expected) in cases.items():
        argv = list(good)
        if flag in argv:
            argv[argv.index(flag):argv.index(flag) + 2] = change
        else:
            argv += change
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_ours_opt_reaches_our_run_only(tmp_path, monkeypatch):
    """A quirk switch such as RESTORE's RATIO_UPDATE_AFTER_EVAL goes to our train.py, not the official one."""
    from restore import parity

    class Stop(Exception):
        pass

    runs: dict[str, list[str]] = {}

    def record(side, spec):
        runs[side] = spec["argv"]
        if side == "ours":
            raise Stop

    monkeypatch.setattr(parity, "_run_side", record)
    argv = [*_runnable_argv(tmp_path, "RESTORE"), "--ours-opt", "TRAINER.RESTORE.RATIO_UPDATE_AFTER_EVAL", "True",
            "OPTIM.LR", "0.01"]
    with pytest.raises(Stop):
        parity.main(argv)
    switch = ["TRAINER.RESTORE.RATIO_UPDATE_AFTER_EVAL", "True"]
    ours, official = " ".join(runs["ours"]), " ".join(runs["official"])
    assert " ".join(switch) in ours and "RATIO_UPDATE_AFTER_EVAL" not in official
    assert "OPTIM.LR 0.01" in ours and "OPTIM.LR 0.01" in official


def test_official_code_one_folder_down_is_found(tmp_path, capsys):
    """KgCoOp's repository keeps train.py in KgCoOp/: the checkout's root is accepted; two candidates
    or none are one sentence naming what was found."""
    from restore.official import official_root
    from restore.parity import main

    repo = tmp_path / "KgCoOp"
    _code_root(repo / "KgCoOp")
    (repo / "Dassl.ProGrad.pytorch").mkdir()
    (repo / "Dassl.ProGrad.pytorch" / "train.py").write_text("")  # no clip/ beside it: not official code
    assert official_root(str(repo)) == str(repo / "KgCoOp")
    assert official_root(str(repo / "KgCoOp")) == str(repo / "KgCoOp")
    _code_root(repo / "copy")
    with pytest.raises(FileNotFoundError, match=r"subfolders KgCoOp, copy each have them"):
        official_root(str(repo))
    empty = tmp_path / "empty"
    (empty / "ours").mkdir(parents=True)
    (empty / "ours" / "train.py").write_text("")  # a train.py without the official clip package
    argv = _runnable_argv(tmp_path, "KgCoOp")
    argv[argv.index("--official") + 1] = str(empty)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no train.py beside a clip/ package" in err and err.count("\n") == 1


def test_a_failing_side_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    """The official run's process fails: one line with its last output line and its log, exit 1."""
    import subprocess

    from restore import parity

    class Done:
        returncode = 1

    def fake_run(cmd, stdout, **kwargs):
        stdout.write("Traceback (most recent call last):\n  ...\nValueError: num_samples=0\n\n")
        return Done()

    monkeypatch.setattr(subprocess, "run", fake_run)
    code = parity.main(_runnable_argv(tmp_path, "CoOp"))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "the official run failed (exit 1): ValueError: num_samples=0 (whole output:" in err
    assert str(tmp_path / "out" / "plain_official.log") in err


def _code_root(folder):
    """A stand-in official code root: train.py beside clip/clip.py."""
    (folder / "clip").mkdir(parents=True)
    (folder / "clip" / "clip.py").write_text("")
    (folder / "train.py").write_text("")
    return folder


def _runnable_argv(tmp_path, trainer):
    """A parity command line that passes every input check: a stand-in official code root, a
    dataset root holding dtd/images and a weights file, all under ``tmp_path``."""
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"x")
    return ["--official", str(_code_root(tmp_path / "official")), "--trainer", trainer, "--root", str(tmp_path),
            "--weights", str(weights), "--output", str(tmp_path / "out"), "--repo", REPO_ROOT]
