"""The platform/plugin boundary: methods describe themselves (restore.methods), the platform names none,
a new method is picked up by the protocol runner, aggregation and benchmark without touching the
platform, and a wheel installed outside the checkout runs RESTORE."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import tiny_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXAMPLE_METHOD = '''
"""A tiny example method living in its own plugin package."""
from typing import Any

from restore.methods import MethodSpec, register_method
from restore.prompting.context import TextContext
from restore.prompting.trainer import PromptModel, PromptTrainer


class ExampleModel(PromptModel):
    def __init__(self, clip_model, classnames, node):
        super().__init__(clip_model, classnames)
        self.prompt_learner = TextContext(clip_model, classnames, n_ctx=node.N_CTX, init_mode="all_words")

    def encode_text(self):
        return self.text_encoder(self.prompt_learner(), self.prompt_learner.eot_index).features


class ExamplePrompt(PromptTrainer):
    model_name = "prompt_learner"
    default_cfg: dict[str, Any] = {"N_CTX": 2, "PREC": "auto"}

    def build_prompt_model(self, cfg, classnames, clip_model):
        return ExampleModel(clip_model, classnames, self.method_cfg)


SPEC = register_method(MethodSpec(
    "example", "ExamplePrompt", label="Example", aliases=("ex",),
    published_by_config={"tiny": "CoOp"},
    configs={"base2new": ("ExamplePrompt/tiny",)},
    dataset_overrides={"base2new": "ExamplePrompt/dataset_overrides/base2new.yaml"},
    extras={"benchmark_reference": True},
), ExamplePrompt)
'''

EXAMPLE_CONFIG = tiny_run_config(lr=0.002, schedule=False, extra="INPUT:\n  SIZE: (224, 224)\n")


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """The example method written as its own package (module + configs), imported, unregistered after."""
    from restore import methods
    from restore.engine.registry import TRAINER_REGISTRY

    plugin = tmp_path / "plugin"
    (plugin / "example_method").mkdir(parents=True)
    (plugin / "example_method" / "__init__.py").write_text(textwrap.dedent(EXAMPLE_METHOD))
    cfg_dir = plugin / "configs" / "trainers" / "ExamplePrompt"
    (cfg_dir / "dataset_overrides").mkdir(parents=True)
    (cfg_dir / "tiny.yaml").write_text(EXAMPLE_CONFIG)
    (cfg_dir / "dataset_overrides" / "base2new.yaml").write_text("dtd:\n  TRAINER.EXAMPLEPROMPT.N_CTX: 3\n")
    monkeypatch.syspath_prepend(str(plugin))
    monkeypatch.setenv("RESTORE_PLUGINS", "example_method")
    try:
        yield plugin
    finally:
        methods._METHODS.pop("example", None)
        TRAINER_REGISTRY._obj_map.pop("ExamplePrompt", None)
        sys.modules.pop("example_method", None)


def test_example_method_is_picked_up_by_scripts_aggregation_and_benchmark(example_plugin, tmp_path, capsys):
    from restore import protocols as P
    from restore.datasets.synthetic import make_synthetic
    from restore.evaluation import aggregate as A
    from restore.methods import _main as methods_main
    from restore.benchmark import main as benchmark_main

    assert methods_main([]) == 0  # python -m restore.methods: found through RESTORE_PLUGINS
    listed = capsys.readouterr().out
    assert re.search(r"^example\s+--trainer ExamplePrompt\s+label Example", listed, re.M), listed

    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic("dtd", str(data), num_classes=4, images_per_class=4)
    common = ["--data", str(data), "--output", str(out), "DATASET.NUM_SHOTS", "2"]
    assert P.main(["base2new-train", "ex", "dtd", "1", *common]) == 0
    assert P.main(["base2new-test", "example", "dtd", "1", *common]) == 0
    run = out / "base2new" / "train_base" / "dtd" / "shots_16" / "Example" / "tiny" / "seed1"
    assert json.loads((run / "results.json").read_text())["trainer"] == "ExamplePrompt"
    saved = (run / "config.yaml").read_text()
    assert re.search(r"EXAMPLEPROMPT:\n(\s+\w+: .*\n)*?\s+N_CTX: 3\n", saved), "the method's dataset override"

    markdown, _ = A.aggregate(str(out), plot=False)
    assert re.search(r"^#+ .*\bExample\b", markdown, re.M), markdown[:2000]  # the method's own table
    assert A.published_method("Example", "tiny") == "CoOp"  # the spec's own published row for this config

    js = tmp_path / "bench.json"
    assert benchmark_main(["--tiny", "--device", "cpu", "--trainers", "ExamplePrompt", "--no-memory",
                           "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert "error" not in report["results"]["ExamplePrompt"]["12"]
    assert report["text_speedup_1000"] > 0  # measured on the method the spec marks as the reference


_METHOD_WORDS = re.compile(r"\b(RESTORE|MMRL|MaPLe|CoOp|CoCoOp|KgCoOp|IVLP|VPT|PromptSRC|Craft|ZeroshotCLIP)\b")
_METHOD_IDENT = re.compile(r"(?<![a-z])(mmrl|maple|coop|cocoop|kgcoop|ivlp|vpt|promptsrc|craft|zsclip|zeroshotclip)",
                           re.I)
_METHOD_KEYS = {"mmrl", "maple", "coop", "cocoop", "kgcoop", "ivlp", "vpt", "promptsrc", "craft", "zsclip",
                "zeroshotclip"}
# references to the CoOp *repository* (its DATASETS.md, issues, log format), not the method
_REPOSITORY_REFERENCES = re.compile(r"CoOp's DATASETS\.md|CoOp#\d+|provided by CoOp|as CoOp's parse_test_res|"
                                    r"^#? ?RESTORE benchmark")


def test_platform_names_no_method_and_imports_no_repository_module():
    """Outside docstrings, no string or identifier in restore/ names a method; nothing imports the
    repository's train.py, trainers or datasets."""
    hits = []
    for path in sorted(pathlib.Path(ROOT, "restore").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                named = _METHOD_WORDS.search(node.value) or node.value.lower() in _METHOD_KEYS
                if named and not _REPOSITORY_REFERENCES.search(node.value):
                    hits.append(f"{where} string {node.value[:60]!r}")
            names = {ast.Name: "id", ast.Attribute: "attr", ast.FunctionDef: "name", ast.ClassDef: "name",
                     ast.arg: "arg"}
            for kind, attr in names.items():
                if isinstance(node, kind) and _METHOD_IDENT.search(getattr(node, attr)):
                    hits.append(f"{where} identifier {getattr(node, attr)}")
            if isinstance(node, ast.Import):
                hits += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in
                         ("train", "trainers", "datasets")]
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in \
                    ("train", "trainers", "datasets"):
                hits.append(f"{where} from {node.module} import")
    assert not hits, "\n".join(hits)


def test_importing_one_method_registers_that_method_only():
    """RESTORE's module imports MaPLe's, IVLP's and PromptSRC's models; in a fresh interpreter, importing it
    registers RESTORE alone (a host codebase keeps its own MaPLe / IVLP)."""
    code = ("import trainers.restore_trainer, trainers.kgcoop\n"
            "from restore.engine.registry import TRAINER_REGISTRY\n"
            "from restore.methods import list_methods\n"
            "print(' '.join(sorted(TRAINER_REGISTRY.registered_names())), '|', ' '.join(s.key for s in list_methods()))\n"
            "import trainers; trainers.register_all()\n"
            "print(' '.join(sorted(TRAINER_REGISTRY.registered_names())))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, everything = proc.stdout.strip().splitlines()
    assert first == "KgCoOp RESTORE | restore kgcoop"
    assert everything.split() == sorted(["CoCoOp", "CoOp", "IVLP", "KgCoOp", "MaPLe", "MMRL", "PromptSRC", "RESTORE",
                                         "VPT", "ZeroshotCLIP"])


def _fresh_venv(path: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True,
                   timeout=120)
    return path / "bin" / "python"


def _can_build_wheels() -> bool:
    import importlib.util

    import setuptools

    major_minor = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
    return importlib.util.find_spec("wheel") is not None or major_minor >= (70, 1)  # bdist_wheel built in


@pytest.mark.skipif(not _can_build_wheels(), reason="this environment's setuptools cannot build wheels "
                                                    "(pip install wheel, or setuptools >= 70.1)")
def test_wheel_installed_outside_the_checkout_runs_restore(tmp_path):
    """pip wheel -> fresh venv (torch from the system site) -> python -m restore.launch --trainer RESTORE on a
    synthetic DTD, from a folder that is not the checkout; the plugins come from the wheel."""
    import shutil

    source, wheels = tmp_path / "source", tmp_path / "wheels"  # a copy: the build writes build/ beside setup.py
    def skipped(folder: str, names: list[str]) -> set[str]:
        top = os.path.abspath(folder) == os.path.abspath(ROOT)
        return {n for n in names if n in (".git", ".venv", "__pycache__") or n.endswith(".egg-info")
                or (top and (n in ("build", "dist", "tests") or n.startswith(("output", "demo_output"))))}

    shutil.copytree(ROOT, source, ignore=skipped)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300,
                           cwd=str(tmp_path))
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("restore_prompt-*.whl"))
    python = _fresh_venv(tmp_path / "venv")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RESTORE_PLUGINS")}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import restore, restore_plugins.trainers as t, restore_plugins.configs as c; "
                      "print(restore.__file__); print(t.__file__); print(list(c.__path__)[0])")
    assert where.returncode == 0, where.stderr[-2000:]
    restore_file, trainers_file, configs = where.stdout.split()
    site = str(tmp_path / "venv")
    assert restore_file.startswith(site) and trainers_file.startswith(site) and configs.startswith(site)
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(restore_file)), "datasets"))
    data = run("-m", "restore.datasets.synthetic", "dtd", "--root", str(work / "data"), "--classes", "4",
               "--images-per-class", "4")
    assert data.returncode == 0, data.stderr[-2000:]
    out = work / "out"
    proc = run("-m", "restore.launch", "--root", str(work / "data"), "--seed", "1", "--trainer", "RESTORE",
               "--dataset-config-file", os.path.join(configs, "datasets", "dtd.yaml"),
               "--config-file", os.path.join(configs, "trainers", "RESTORE", "vit_b16_c2_ep10_batch4_2ctx.yaml"),
               "--output-dir", str(out), "MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "1",
               "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "DATALOADER.TEST.BATCH_SIZE", "8",
               "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "base")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    record = json.loads((out / "results.json").read_text())
    assert record["trainer"] == "RESTORE" and record["num_classes"] == 2 and 0 <= record["accuracy"] <= 100
    log = (out / "log.txt").read_text()
    # the dataset overrides came from the wheel's package data (DTD: VISION_RATIO 0.15, FS_WEIGHT 0.5)
    assert "RESTORE dataset overrides for DescribableTextures: TRAINER.RESTORE.VISION_RATIO 0.15" in proc.stdout + log
    assert record["restore"]["fs_weight"] == 0.5  # (the ratios move after the epoch: one-shot update)


def test_dataset_overrides_precedence_and_a_bad_entry(tmp_path):
    """Overrides change the defaults and the YAML's values, not a pinned key nor a key in the opts; a key
    the config does not have is one ConfigError sentence naming the file."""
    from restore.engine.config import ConfigError, extend_cfg, get_cfg_default
    from restore.methods import MethodSpec, apply_dataset_overrides

    folder = tmp_path / "configs" / "trainers" / "RESTORE" / "dataset_overrides"
    folder.mkdir(parents=True)
    (folder / "base2new.yaml").write_text("dtd:\n  TRAINER.RESTORE.FS_WEIGHT: 0.5\n  TRAINER.RESTORE.TEXT_RATIO: 0.3\n"
                                          "  OPTIM.LR: 0.5\n"
                                          "eurosat:\n  TRAINER.RESTORE.NO_SUCH_KEY: 1\n")
    spec = MethodSpec("r", "RESTORE", dataset_overrides={"base2new": "RESTORE/dataset_overrides/base2new.yaml"},
                      config_root=str(tmp_path / "configs"))

    def cfg_for(dataset, pins=()):
        cfg = extend_cfg(get_cfg_default())
        cfg.DATASET.NAME, cfg.TRAINER.NAME, cfg.DATASET_OVERRIDES.PIN = dataset, "RESTORE", list(pins)
        cfg.freeze()
        return cfg

    cfg = cfg_for("DescribableTextures", pins=["TRAINER.RESTORE.TEXT_RATIO"])
    applied = apply_dataset_overrides(cfg, ["OPTIM.LR", "0.1"], spec=spec)
    assert applied == {"TRAINER.RESTORE.FS_WEIGHT": 0.5}
    assert cfg.is_frozen() and cfg.TRAINER.RESTORE.FS_WEIGHT == 0.5
    assert cfg.TRAINER.RESTORE.TEXT_RATIO == extend_cfg(get_cfg_default()).TRAINER.RESTORE.TEXT_RATIO
    with pytest.raises(ConfigError, match=r"base2new\.yaml: the values for EuroSAT do not fit the config .*fix that entry"):
        apply_dataset_overrides(cfg_for("EuroSAT"), spec=spec)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # imported by conftest, run again here
@pytest.mark.parametrize("module", ["trainers.restore_trainer", "trainers.coop"])
def test_running_a_trainer_file_as_a_program_says_what_to_run(module, capsys):
    """A method file run with ``python -m`` registers nothing and says, in one line, which commands to use."""
    import runpy

    from restore.engine.registry import TRAINER_REGISTRY

    before = dict(TRAINER_REGISTRY._obj_map)
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "is a method plugin, not a program" in err and "python -m restore.methods --overrides DATASET" in err
    assert dict(TRAINER_REGISTRY._obj_map) == before


def test_a_checkout_runs_beside_another_copy_of_its_plugins(tmp_path):
    """A second clone run while the first is installed (pip install -e): its datasets/ and trainers/ and
    the installed copies (other module names, other files) are both imported. The first copy stays
    registered instead of a duplicate-name KeyError; a different class under a taken name still fails."""
    import shutil

    for package in ("datasets", "trainers"):
        shutil.copytree(os.path.join(ROOT, package), tmp_path / f"installed_{package}",
                        ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import datasets, trainers\n"
            "trainers.register_all()\n"
            "import installed_datasets, installed_trainers\n"
            "installed_trainers.register_all()\n"
            "from restore.engine.registry import DATASET_REGISTRY, TRAINER_REGISTRY\n"
            "print(DATASET_REGISTRY.get('DescribableTextures').__module__, TRAINER_REGISTRY.get('RESTORE').__module__)\n"
            "class DescribableTextures: pass\n"
            "try:\n"
            "    DATASET_REGISTRY.register(DescribableTextures)\n"
            "except KeyError as err:\n"
            "    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)])))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, clash = proc.stdout.strip().splitlines()
    assert first == "datasets.dtd trainers.restore_trainer"
    assert "already registered" in clash and "by datasets.dtd; again by __main__" in clash
