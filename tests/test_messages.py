"""Bad input gives one sentence and keeps earlier outputs: config YAMLs, nonsense settings, worker
errors, full disks, read-only dataset folders, split labels, and the newcomer rough edges (worker
count, --help texts, empty folders, runpy warnings)."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from helpers import run_train_py

from restore.engine.config import ConfigError, get_cfg_default, merge_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from restore.datasets.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("msg_data")
    make_synthetic("dtd", str(root), num_classes=2, images_per_class=6)
    return root


def _img(path):
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return str(path)


def _args(data, out, *opts, seed="1"):
    return ["--root", str(data), "--trainer", "CoOp", "--seed", seed, "--output-dir", str(out),
            "--dataset-config-file", os.path.join(ROOT, "configs", "datasets", "dtd.yaml"),
            "MODEL.BACKBONE.NAME", "tiny", "TRAINER.COOP.N_CTX", "2", "OPTIM.MAX_EPOCH", "1",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "DATALOADER.TEST.BATCH_SIZE", "8",
            "INPUT.TRANSFORMS", "['normalize']", "USE_CUDA", "False", *opts]


# ---------------------------------------------------------------- config YAMLs


def test_yaml_errors_name_the_file_and_line(tmp_path):
    from restore.engine.config import load_yaml

    cfg = get_cfg_default()
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("OPTIM:\n  LR: [0.1\n  MAX_EPOCH: 1\n")
    with pytest.raises(ConfigError, match=rf"^Malformed YAML in {syntax} at line 3, column 12: expected ',' or "
                                          r"'\]', but got ':' \(while parsing a flow sequence at line 2\)\."):
        merge_file(cfg, str(syntax))
    listed = tmp_path / "list.yaml"
    listed.write_text("- OPTIM\n- LR\n")
    with pytest.raises(ConfigError, match=rf"^{listed} holds a YAML list, not a mapping of config keys"):
        merge_file(cfg, str(listed))
    twice = tmp_path / "twice.yaml"
    twice.write_text("OPTIM:\n  LR: 0.1\n  MAX_EPOCH: 3\n  LR: 0.2\n")
    with pytest.raises(ConfigError, match=rf"^Key 'LR' appears twice in {twice} \(lines 2 and 4\): remove one"):
        merge_file(cfg, str(twice))
    assert cfg.OPTIM.LR == get_cfg_default().OPTIM.LR  # nothing merged from the refused files
    top = tmp_path / "top.yaml"
    top.write_text("OPTIM:\n  LR: 0.1\nOPTIM:\n  MAX_EPOCH: 3\n")
    with pytest.raises(ConfigError, match="Key 'OPTIM' appears twice"):
        load_yaml(str(top))


def test_yaml_loader_keeps_merges_empty_files_and_unknown_key_messages(tmp_path):
    from restore.engine.config import load_yaml

    anchors = tmp_path / "anchors.yaml"  # `<<:` keys may be overridden: not a duplicate
    anchors.write_text("BASE: &b\n  LR: 0.1\n  MAX_EPOCH: 2\nOPTIM:\n  <<: *b\n  LR: 0.5\n")
    assert load_yaml(str(anchors))["OPTIM"] == {"LR": 0.5, "MAX_EPOCH": 2}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(str(empty)) == {}
    good = tmp_path / "good.yaml"
    good.write_text("OPTIM:\n  LR: 0.25\n  STEPSIZE: (3, 5)\n")
    cfg = get_cfg_default()
    merge_file(cfg, str(good))
    assert cfg.OPTIM.LR == 0.25 and cfg.OPTIM.STEPSIZE == (3, 5)  # yacs' literal decoding kept
    typo = tmp_path / "typo.yaml"
    typo.write_text("OPTIM:\n  LRR: 0.25\n")
    with pytest.raises(ConfigError, match=rf"^Unknown config key 'OPTIM.LRR' in {typo}. Did you mean OPTIM.LR\?$"):
        merge_file(cfg, str(typo))


def test_dataset_overrides_yaml_with_a_key_twice_is_refused(tmp_path):
    from restore.methods import MethodSpec, dataset_overrides

    folder = tmp_path / "configs" / "trainers" / "M" / "dataset_overrides"
    folder.mkdir(parents=True)
    (folder / "base2new.yaml").write_text("dtd:\n  TRAINER.M.W: 1.0\n  TRAINER.M.W: 2.0\n")
    spec = MethodSpec("m", "M", dataset_overrides={"base2new": "M/dataset_overrides/base2new.yaml"},
                      config_root=str(tmp_path / "configs"))
    with pytest.raises(ConfigError, match=r"Key 'TRAINER.M.W' appears twice in .*base2new.yaml \(lines 2 and 3\)"):
        dataset_overrides(spec, "dtd")


# ---------------------------------------------------------------- settings


def test_nonsense_settings_are_refused():
    from restore.engine.config import check_settings

    cfg = get_cfg_default()
    cfg.DATASET.NUM_SHOTS, cfg.SEED, cfg.OPTIM.MAX_EPOCH = 16, -1, 0
    check_settings(cfg, training=False)  # an evaluation needs no epochs; -1 = unseeded
    with pytest.raises(ConfigError, match=r"^OPTIM.MAX_EPOCH 0 trains nothing: give 1 or more epochs"):
        check_settings(cfg, training=True)
    cfg.OPTIM.MAX_EPOCH = 5
    for shots in (0, -2):
        cfg.DATASET.NUM_SHOTS = shots
        with pytest.raises(ConfigError, match=rf"^DATASET.NUM_SHOTS {shots} is not a shot count"):
            check_settings(cfg)
    cfg.DATASET.NUM_SHOTS, cfg.SEED = -1, -3
    with pytest.raises(ConfigError, match=r"^SEED -3 is negative: give a seed of 0 or more, or -1 for an unseeded"):
        check_settings(cfg)


def test_train_py_refuses_before_writing_anything(data, tmp_path, capsys):
    cases = [(["--seed", "-4"], [], "error: --seed -4 is negative"),
             ([], ["DATASET.NUM_SHOTS", "0"], "error: DATASET.NUM_SHOTS 0 is not a shot count"),
             ([], ["SEED", "-9"], "error: SEED -9 is negative"),
             ([], ["OPTIM.MAX_EPOCH", "0"], "error: OPTIM.MAX_EPOCH 0 trains nothing")]
    for i, (flags, opts, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        args = _args(data, out, *opts)
        split = args.index("MODEL.BACKBONE.NAME")
        assert run_train_py(args[:split] + flags + args[split:]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
        assert not out.exists()


def test_help_texts_agree_with_the_readme(capsys):
    import train
    from restore.datasets import synthetic

    seed_help = " ".join(train.build_parser().format_help().split())
    assert "--seed SEED random seed (0 or more); -1 (the default) keeps the config's SEED" in seed_help
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "`--seed 0` is honoured and `--seed -1` (the default)\n  keeps the YAML's `SEED`" in f.read()
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--classes CLASSES number of classes (default: 4)" in text
    assert "--images-per-class IMAGES_PER_CLASS images per class n;" in text
    assert "--seed SEED seed of the image noise; the same seed writes the same files (default: 0)" in text


# ---------------------------------------------------------------- error sentences


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, idx):
        raise OSError("Cannot read image /data/x.jpg (truncated). Re-extract the dataset.")


def test_error_message_unwraps_worker_errors_and_keeps_quotes():
    from restore.engine.utils import error_message

    def first_error():
        try:
            next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))
        except OSError as err:
            return err.with_traceback(None)  # no frame keeps the loader (and its worker) alive
        return None

    err = first_error()
    assert "DataLoader worker process 0" in str(err)  # torch's wrapping, with the worker's traceback
    assert error_message(err) == "Cannot read image /data/x.jpg (truncated). Re-extract the dataset."
    assert error_message(KeyError("Unknown trainer 'X'")) == "Unknown trainer 'X'"
    assert error_message(KeyError('name "y"')) == 'name "y"'
    assert error_message(ValueError("Did you mean 'MaPLe'")) == "Did you mean 'MaPLe'"
    assert error_message(PermissionError(13, "Permission denied", "/d/.s.json.tmp")).endswith("'/d/.s.json.tmp'")


def test_full_disk_names_the_file_and_keeps_the_earlier_one(tmp_path):
    from restore.engine.utils import DiskFullError, atomic_torch_save, error_message

    path = tmp_path / "model.pth.tar-1"
    atomic_torch_save({"w": torch.zeros(4)}, str(path))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # EFBIG past 4 KiB (Python ignores SIGXFSZ)
    try:
        with pytest.raises(DiskFullError) as info:
            atomic_torch_save({"w": torch.ones(100_000)}, str(path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG
    assert str(info.value) == (f"Cannot write {path}: File too large. Free disk space (or raise the file-size "
                               "limit, `ulimit -f`) and run again; files written before are intact.")
    assert error_message(RuntimeError("writer failed")) == "writer failed"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(4))  # the earlier file is intact
    assert os.listdir(tmp_path) == ["model.pth.tar-1"]  # no partial temporary file left


def test_full_disk_under_the_log_stops_the_tee_once(capsys):
    from restore.engine.utils import DiskFullError, Logger

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    logger = Logger("/dev/full")
    with pytest.raises(DiskFullError, match=r"^Cannot write /dev/full: No space left on device\. Free disk space"):
        logger.write("a line\n")
    assert logger.file is None
    logger.write("still shown\n")  # the console goes on
    assert capsys.readouterr().out == "a line\nstill shown\n"


# ---------------------------------------------------------------- datasets


def test_split_label_outside_the_class_range_names_label_and_file(tmp_path):
    from restore.engine.data import DatasetNotFoundError, read_split
    for name in ("a0.png", "a1.png", "b0.png"):
        _img(tmp_path / name)
    split = {"train": [["a0.png", 0, "a"], ["b0.png", 1, "b"], ["a1.png", 13, "a"]], "val": [], "test": []}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    with pytest.raises(DatasetNotFoundError, match=rf"^Label 13 \(class 'a'\) in the 'train' split of {path} is "
                                                   r"outside the class range: labels must run 0..N-1 without gaps, "
                                                   r"and the file has 0..1, then 13\."):
        read_split(str(path), str(tmp_path))


def test_split_label_outside_the_class_range_through_the_dataset_is_one_sentence(tmp_path):
    """The benchmark loader names the dataset and the label; no folder layout follows (the layout is fine)."""
    import datasets  # noqa: F401  registers DescribableTextures
    from restore.datasets.synthetic import make_synthetic
    from restore.engine.data import DatasetNotFoundError, build_dataset

    make_synthetic("dtd", str(tmp_path / "data"), num_classes=2, images_per_class=6)
    (path,) = (tmp_path / "data" / "dtd").glob("split_zhou_*.json")
    split = json.loads(path.read_text())
    split["train"][0][1] = 9
    path.write_text(json.dumps(split))
    cfg = get_cfg_default()
    cfg.DATASET.NAME, cfg.DATASET.ROOT = "DescribableTextures", str(tmp_path / "data")
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(cfg)
    message = str(err.value)
    assert message.startswith("DescribableTextures: Label 9 (class ") and f"split of {path}" in message
    assert "\n" not in message and "Expected layout" not in message, message


def test_read_only_dataset_folder_says_to_set_cache_dir(tmp_path):
    import datasets  # noqa: F401  registers DescribableTextures
    from restore.datasets.synthetic import make_synthetic
    from restore.engine.data import build_dataset

    make_synthetic("dtd", str(tmp_path / "data"), num_classes=2, images_per_class=6, split_json=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a CACHE_DIR inside a file cannot be created (root ignores permissions)
    cfg = get_cfg_default()
    cfg.DATASET.NAME, cfg.DATASET.ROOT = "DescribableTextures", str(tmp_path / "data")
    cfg.DATASET.CACHE_DIR = str(blocker)
    cached = blocker / "dtd" / "split_zhou_DescribableTextures.json"
    with pytest.raises(OSError, match=rf"^Cannot write the split file {cached} \(Not a directory\)\. Make the "
                                      r"dataset folder writable or set DATASET.CACHE_DIR to a writable folder\.$"):
        build_dataset(cfg)


def test_unseeded_run_never_uses_the_fewshot_cache(tmp_path, capsys):
    from restore.engine.data import Datum, load_or_create_fewshot
    train = [Datum(_img(tmp_path / f"im{i}.png"), label=i % 2, classname=f"c{i % 2}") for i in range(8)]
    stale = tmp_path / "split_fewshot" / "shot_2-seed_-1.pkl"
    stale.parent.mkdir()
    stale.write_bytes(b"not a pickle")  # would fail if it were read
    cfg = get_cfg_default()
    new_train, new_val = load_or_create_fewshot(cfg, str(tmp_path), train, train, num_shots=2, seed=-1)
    assert len(new_train) == 4 and len(new_val) == 4
    assert os.listdir(stale.parent) == ["shot_2-seed_-1.pkl"] and stale.read_bytes() == b"not a pickle"
    assert "Unseeded run: drawing the few-shot images afresh" in capsys.readouterr().out


def test_worker_count_is_capped_at_the_cpus_once(capsys):
    from restore.engine.data.data_manager import loader_workers

    cfg = get_cfg_default()
    cpus = len(os.sched_getaffinity(0))
    cfg.DATALOADER.NUM_WORKERS = cpus + 1000
    assert loader_workers(cfg) == cpus and loader_workers(cfg) == cpus
    assert capsys.readouterr().out == (f"DATALOADER.NUM_WORKERS {cpus + 1000} is more than the {cpus} CPUs "
                                       f"available: using {cpus} loader workers\n")
    cfg.DATALOADER.NUM_WORKERS = 1
    assert loader_workers(cfg) == 1 and capsys.readouterr().out == ""


def test_unseeded_scarce_shots_run_records_what_it_used(data, tmp_path, capsys):
    """An unseeded 100-shot run on 3 train images per class: one warning, results.json says "unseeded" and the
    shots each class used, no few-shot cache is written, and no empty tensorboard/ folder is left."""
    out = tmp_path / "run"
    assert run_train_py(_args(data, out, "DATASET.NUM_SHOTS", "100", seed="-1")) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("Warning: DATASET.NUM_SHOTS 100 is more than the train images of 2 of the 2 classes; "
                        "they keep all theirs (3 images).") == 1
    record = json.loads((out / "results.json").read_text())
    assert record["seed"] == "unseeded" and record["num_shots"] == 100 and record["shots_per_class"] == [3, 3]
    log = (out / "log.txt").read_text()
    assert 'Unseeded run (SEED -1): few-shot images, initialisation and batch order differ' in log
    assert not (data / "dtd" / "split_fewshot").exists()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert not (out / "tensorboard").exists()


def test_cli_modules_are_not_imported_by_their_packages():
    """runpy warns when the module ``python -m`` runs was imported by its package (or the alias .pth) before."""
    code = ("import sys, restore.dassl_alias, restore.evaluation, trainers; "
            "print([m for m in ('restore.dassl_alias.__main__', 'restore.evaluation.results', 'trainers.mmrl', "
            "'trainers.restore_trainer') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
    import trainers  # noqa: F401
    from restore.engine.registry import TRAINER_REGISTRY

    assert TRAINER_REGISTRY.get("RESTORE").__module__ == "trainers.restore_trainer"  # imported on lookup
