"""One run per output folder, and what ``--output-dir`` may name (train.py on a synthetic DTD, tiny CLIP).

Covers: a second train.py on a folder in use is refused at once with one sentence naming the holder's
PID and host (a real subprocess, training; in-process, --eval-only with other options) and the first
run's files stay as they were; a lock file left by a dead process is taken over and removed when the
run ends; under torchrun only rank 0 locks; an existing file as --output-dir is refused and left
untouched; a new folder named like a log file (``run.log``) holds its log.txt; runs of a backbone with
random weights default to ``output_random`` (train.py and the protocol scripts).
"""

from __future__ import annotations

import json
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
from helpers import run_train_py

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
OPTS = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0", "DATALOADER.NUM_WORKERS",
        "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATALOADER.TEST.BATCH_SIZE", "50", "DATASET.NUM_SHOTS", "4",
        "DATASET.SUBSAMPLE_CLASSES", "base"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from restore.datasets.synthetic import make_synthetic

    root = str(tmp_path_factory.mktemp("data"))
    make_synthetic("dtd", root, num_classes=4, images_per_class=6)
    return root


def _args(data_root: str, out: str, *extra: str) -> list[str]:
    return ["--root", data_root, "--seed", "1", "--trainer", "CoOp", "--dataset-config-file",
            osp.join(ROOT, "configs", "datasets", "dtd.yaml"), "--config-file",
            osp.join(ROOT, "configs", "trainers", "CoOp", "vit_b16_ep50.yaml"), "--output-dir", out, *extra, *OPTS]


def _snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = osp.join(dirpath, name)
            with open(path, "rb") as f:
                out[osp.relpath(path, folder)] = f.read()
    return out


def _busy_sentence(folder: str) -> str:
    return f"{folder} is in use by another run (PID {os.getpid()} on host {socket.gethostname()}, started "


def test_second_run_on_a_folder_in_use_is_refused(data_root, tmp_path, capsys):
    from restore.engine.output_dir import LOCK_FILE, lock_output_dir

    out = str(tmp_path / "run")
    lock = lock_output_dir(out)  # the first run, still going: it holds the folder and has written files
    try:
        for name, text in [("log.txt", "epoch [1/5] first run\n"), ("results.json", '{"accuracy": 12.5}\n'),
                           ("prompt_learner/checkpoint", "model.pth.tar-1\n")]:
            os.makedirs(osp.dirname(osp.join(out, name)), exist_ok=True)
            with open(osp.join(out, name), "w") as f:
                f.write(text)
        before = _snapshot(out)
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "train.py", *_args(data_root, out, "--overwrite")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: " + _busy_sentence(out)), proc.stderr
        assert lines[0].endswith("wait for it to finish or stop it, or choose another output folder.")
        # --eval-only with other options is refused the same way
        assert run_train_py(_args(data_root, out, "--eval-only", "--model-dir", out) + ["OPTIM.MAX_EPOCH", "3"]) == 2
        assert _busy_sentence(out) in capsys.readouterr().err
        assert _snapshot(out) == before  # the first run's log, results and checkpoints untouched
        with open(osp.join(out, LOCK_FILE)) as f:
            assert json.load(f)["pid"] == os.getpid()  # still the first run's lock
    finally:
        lock.release()
    assert not osp.exists(osp.join(out, LOCK_FILE))


def test_lock_of_a_dead_run_is_taken_over_and_a_log_named_folder_holds_log_txt(data_root, tmp_path, capsys):
    from restore.engine.output_dir import LOCK_FILE, output_dir_holder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs, as a crashed run leaves it
    out = str(tmp_path / "run.log")  # Dassl's setup_logger would take this name for the log file itself
    os.makedirs(out)
    with open(osp.join(out, LOCK_FILE), "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "2024-01-01 00:00:00"}, f)
    assert output_dir_holder(out) is None  # nobody holds it: the runner would not refuse the folder
    assert run_train_py(_args(data_root, out)) == 0
    printed = capsys.readouterr().out
    assert (f"Note: the previous run in {out} (PID {dead.pid} on host {socket.gethostname()}, started "
            "2024-01-01 00:00:00) ended without releasing its lock (crashed or killed); this run takes the folder "
            "over.") in printed
    assert osp.isdir(out) and osp.isfile(osp.join(out, "log.txt")) and osp.isfile(osp.join(out, "results.json"))
    assert not osp.exists(osp.join(out, LOCK_FILE))  # released at the end of the run


@pytest.mark.parametrize("name", ["notes.txt", "run.log", "results"])
def test_output_dir_naming_an_existing_file_is_refused(data_root, tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("my own notes\n")
    assert run_train_py(_args(data_root, str(path))) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --output-dir {path} is an existing file, not a folder: give a folder name (it "
                           "will hold log.txt, config.yaml, checkpoints and results.json); the file was not touched.")
    assert path.read_text() == "my own notes\n"
    assert sorted(os.listdir(tmp_path)) == [name]  # no log written beside it either


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    from restore.engine.output_dir import OutputDirInUse, lock_output_dir

    out = str(tmp_path / "run")
    held = lock_output_dir(out)
    try:
        monkeypatch.setenv("RANK", "1")  # another rank of the same torchrun job
        other = lock_output_dir(out)
        assert not other.held
        other.release()
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(OutputDirInUse, match=r"in use by another run \(PID \d+ on host "):
            lock_output_dir(out)
    finally:
        held.release()


@pytest.mark.parametrize("backbone,flags,opts,expected", [
    ("tiny", [], [], "output_random"),
    ("tiny-rn", [], [], "output_random"),
    ("open_clip:ViT-B-16", [], [], "output_random"),  # no pretrained tag: random weights
    ("ViT-B/16", [], [], "./output"),
    ("tiny", ["--output-dir", "mine"], [], "mine"),
    ("tiny", [], ["OUTPUT_DIR", "./output"], "./output"),  # asked for explicitly
])
def test_random_backbone_runs_default_to_their_own_root(backbone, flags, opts, expected):
    import train

    args = train.build_parser().parse_args([
        "--trainer", "CoOp", "--dataset-config-file", osp.join(ROOT, "configs", "datasets", "dtd.yaml"), *flags,
        "MODEL.BACKBONE.NAME", backbone, *opts])
    assert train.setup_cfg(args).OUTPUT_DIR == expected


def test_protocol_scripts_put_random_backbone_runs_under_output_random(tmp_path, monkeypatch, capsys):
    from restore import protocols as P

    monkeypatch.delenv("OUTPUT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert P.main(["base2new-train", "coop", "dtd", "1", "--dry-run", "MODEL.BACKBONE.NAME", "tiny"]) == 0
    captured = capsys.readouterr()
    assert "--output-dir output_random/base2new/train_base/dtd/shots_16/CoOp/" in captured.out
    assert "Backbone tiny has random weights: output root output_random/, not output/" in captured.err
    assert P.main(["base2new-train", "coop", "dtd", "1", "--dry-run"]) == 0  # real weights: output/
    assert "--output-dir output/base2new/train_base/dtd/shots_16/CoOp/" in capsys.readouterr().out
    monkeypatch.setenv("OUTPUT", "elsewhere")
    assert P.main(["base2new-test", "coop", "dtd", "1", "--dry-run", "MODEL.BACKBONE.NAME", "tiny"]) == 0
    assert "--output-dir elsewhere/base2new/test_new/dtd/" in capsys.readouterr().out


def test_without_flock_a_live_holder_on_this_host_is_still_refused(tmp_path, monkeypatch):
    """Some Lustre / NFS mounts have no flock: the PID recorded in the lock file is checked instead."""
    import errno

    from restore.engine import output_dir as O

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(O.fcntl, "flock", no_flock)
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2024-01-01 00:00:00"}
    (out / O.LOCK_FILE).write_text(json.dumps(holder))  # a live process (pytest's parent) holds it
    with pytest.raises(O.OutputDirInUse, match=rf"PID {os.getppid()} on host "):
        O.lock_output_dir(str(out))
    assert O.output_dir_holder(str(out)) is not None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / O.LOCK_FILE).write_text(json.dumps({**holder, "pid": dead.pid}))
    assert O.output_dir_holder(str(out)) is None
    with O.lock_output_dir(str(out)) as lock:
        assert lock.previous["pid"] == dead.pid
        assert json.loads((out / O.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / O.LOCK_FILE).exists()
