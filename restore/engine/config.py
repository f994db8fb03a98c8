"""The yacs default config: Dassl 0.6.3's keys plus the few this library adds.

Merge order (as in CoOp's ``train.py``): defaults -> every registered trainer's ``extend_cfg``
-> dataset YAML -> method YAML -> CLI arguments -> trailing ``opts``.
"""

from __future__ import annotations

import os.path as osp
from typing import Any, Iterable

import yaml
from yacs.config import CfgNode as CN

from .registry import TRAINER_REGISTRY, closest_names

_C = CN()
_C.VERSION = 1
_C.OUTPUT_DIR = "./output"
_C.RESUME = ""
_C.SEED = -1
_C.USE_CUDA = True
_C.VERBOSE = True
# Added here: bit-identical repeated runs (deterministic algorithms, seeded workers).
_C.DETERMINISTIC = False
# Added here: evaluation protocol, read by methods whose inference depends on it (MMRL's decoupled
# rule). One of "base2new", "cross_dataset", "domain_generalization", "few_shot".
_C.PROTOCOL = "base2new"
# Added here: config keys a method YAML pins against the method's dataset overrides (restore.methods).
_C.DATASET_OVERRIDES = CN()
_C.DATASET_OVERRIDES.PIN = []

_C.INPUT = CN()
_C.INPUT.SIZE = (224, 224)
_C.INPUT.INTERPOLATION = "bilinear"
_C.INPUT.TRANSFORMS = ()
_C.INPUT.NO_TRANSFORM = False
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
_C.INPUT.CROP_PADDING = 4
_C.INPUT.RRCROP_SCALE = (0.08, 1.0)
_C.INPUT.CUTOUT_N = 1
_C.INPUT.CUTOUT_LEN = 16
_C.INPUT.GN_MEAN = 0.0
_C.INPUT.GN_STD = 0.15
_C.INPUT.RANDAUGMENT_N = 2
_C.INPUT.RANDAUGMENT_M = 10
_C.INPUT.COLORJITTER_B = 0.4
_C.INPUT.COLORJITTER_C = 0.4
_C.INPUT.COLORJITTER_S = 0.4
_C.INPUT.COLORJITTER_H = 0.1
_C.INPUT.RGS_P = 0.2
_C.INPUT.GB_P = 0.5
_C.INPUT.GB_K = 21

_C.DATASET = CN()
_C.DATASET.ROOT = ""
_C.DATASET.NAME = ""
_C.DATASET.SOURCE_DOMAINS = ()
_C.DATASET.TARGET_DOMAINS = ()
_C.DATASET.NUM_LABELED = -1
_C.DATASET.NUM_SHOTS = -1
_C.DATASET.VAL_PERCENT = 0.1
_C.DATASET.STL10_FOLD = -1
_C.DATASET.CIFAR_C_TYPE = ""
_C.DATASET.CIFAR_C_LEVEL = 1
_C.DATASET.ALL_AS_UNLABELED = False
# CoOp-family addition: "all", "base" (first ceil(n/2) labels) or "new".
_C.DATASET.SUBSAMPLE_CLASSES = "all"
# Added here: where split_fewshot/*.pkl caches go ("" = inside the dataset folder, as CoOp).
_C.DATASET.CACHE_DIR = ""

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4
_C.DATALOADER.K_TRANSFORMS = 1
_C.DATALOADER.RETURN_IMG0 = False
_C.DATALOADER.TRAIN_X = CN()
_C.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"
_C.DATALOADER.TRAIN_X.BATCH_SIZE = 32
_C.DATALOADER.TRAIN_X.N_DOMAIN = 0
_C.DATALOADER.TRAIN_X.N_INS = 16
_C.DATALOADER.TRAIN_U = CN()
_C.DATALOADER.TRAIN_U.SAME_AS_X = True
_C.DATALOADER.TRAIN_U.SAMPLER = "RandomSampler"
_C.DATALOADER.TRAIN_U.BATCH_SIZE = 32
_C.DATALOADER.TRAIN_U.N_DOMAIN = 0
_C.DATALOADER.TRAIN_U.N_INS = 16
_C.DATALOADER.TEST = CN()
_C.DATALOADER.TEST.SAMPLER = "SequentialSampler"
_C.DATALOADER.TEST.BATCH_SIZE = 32

_C.MODEL = CN()
_C.MODEL.INIT_WEIGHTS = ""
_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = ""
_C.MODEL.BACKBONE.PRETRAINED = True
# Added here: folder holding OpenAI checkpoint files ("" = ~/.cache/clip).
_C.MODEL.BACKBONE.CACHE_DIR = ""
_C.MODEL.HEAD = CN()
_C.MODEL.HEAD.NAME = ""
_C.MODEL.HEAD.HIDDEN_LAYERS = ()
_C.MODEL.HEAD.ACTIVATION = "relu"
_C.MODEL.HEAD.BN = True
_C.MODEL.HEAD.DROPOUT = 0.0

_C.OPTIM = CN()
_C.OPTIM.NAME = "adam"
_C.OPTIM.LR = 0.0003
_C.OPTIM.WEIGHT_DECAY = 5e-4
_C.OPTIM.MOMENTUM = 0.9
_C.OPTIM.SGD_DAMPNING = 0
_C.OPTIM.SGD_NESTEROV = False
_C.OPTIM.RMSPROP_ALPHA = 0.99
_C.OPTIM.ADAM_BETA1 = 0.9
_C.OPTIM.ADAM_BETA2 = 0.999
_C.OPTIM.STAGED_LR = False
_C.OPTIM.NEW_LAYERS = ()
_C.OPTIM.BASE_LR_MULT = 0.1
_C.OPTIM.LR_SCHEDULER = "single_step"
_C.OPTIM.STEPSIZE = (-1,)
_C.OPTIM.GAMMA = 0.1
_C.OPTIM.MAX_EPOCH = 10
_C.OPTIM.WARMUP_EPOCH = -1
_C.OPTIM.WARMUP_TYPE = "linear"
_C.OPTIM.WARMUP_CONS_LR = 1e-5
_C.OPTIM.WARMUP_MIN_LR = 1e-5
_C.OPTIM.WARMUP_RECOUNT = True

_C.TRAIN = CN()
_C.TRAIN.CHECKPOINT_FREQ = 0
_C.TRAIN.PRINT_FREQ = 10
_C.TRAIN.COUNT_ITER = "train_x"

_C.TEST = CN()
_C.TEST.EVALUATOR = "Classification"
_C.TEST.PER_CLASS_RESULT = False
_C.TEST.COMPUTE_CMAT = False
_C.TEST.NO_TEST = False
_C.TEST.SPLIT = "test"
_C.TEST.FINAL_MODEL = "last_step"

_C.TRAINER = CN()
_C.TRAINER.NAME = ""


def get_cfg_default() -> CN:
    """Return a fresh copy of the default config (Dassl keys plus this library's additions)."""
    return _C.clone()


def clean_cfg(cfg: CN, trainer: str) -> None:
    """Drop every ``cfg.TRAINER.*`` node except NAME and the node of ``trainer`` (Dassl semantics)."""
    keep = {"NAME", trainer.upper()}
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    for key in list(cfg.TRAINER.keys()):
        if key not in keep:
            cfg.TRAINER.pop(key)
    if was_frozen:
        cfg.freeze()


_CONFIG_EXTENDERS: list = []


def register_config_extender(fn):  # type: ignore[no-untyped-def]
    """Register ``fn(cfg)`` adding keys of a plug-in that is not a trainer (e.g. ``TRAINER.CRAFT``)."""
    if fn not in _CONFIG_EXTENDERS:
        _CONFIG_EXTENDERS.append(fn)
    return fn


def extend_cfg(cfg: CN) -> CN:
    """Add every registered trainer's own ``TRAINER.<NAME>`` node (and other keys it declares).

    A trainer declares its defaults once, in a classmethod ``extend_cfg(cfg)``. CoOp-style
    codebases that use a trainer of this library call this from their own ``extend_cfg``.
    """
    for _, trainer_cls in TRAINER_REGISTRY.items():
        extender = getattr(trainer_cls, "extend_cfg", None)
        if callable(extender):
            extender(cfg)
    for fn in _CONFIG_EXTENDERS:
        fn(cfg)
    return cfg


def add_node(cfg: CN, dotted: str, defaults: dict[str, Any]) -> CN:
    """Create ``cfg.<dotted>`` if missing and fill in ``defaults`` for keys it lacks."""
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            node[part] = CN()
        node = node[part]
    for key, value in defaults.items():
        if key not in node:
            node[key] = CN(value) if isinstance(value, dict) else value
    return node


class ConfigError(ValueError):
    """A config key or value the library cannot use, with a sentence saying what to do."""


def _all_keys(node: CN, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, CN):
            keys.extend(_all_keys(value, full + "."))
    return keys


def merge_opts(cfg: CN, opts: Iterable[str], source: str = "command line") -> None:
    """``merge_from_list`` that turns yacs' bare AssertionError into a one-line ConfigError."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"Config options from the {source} must come in KEY VALUE pairs, got {opts}")
    known = _all_keys(cfg)
    for key in opts[0::2]:
        if key not in known:
            hint = closest_names(key, known, n=1)
            suggestion = f" Did you mean {hint[0]}?" if hint else ""
            raise ConfigError(f"Unknown config key {key!r} (from the {source}).{suggestion}")
    try:
        cfg.merge_from_list(opts)
    except (ValueError, AssertionError) as err:
        raise ConfigError(f"Bad config value from the {source}: {err}") from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` entries may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # unhashable key: SafeLoader raises its own error below
                    break
                if seen:
                    raise _DuplicateKey(key, first[key], key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def load_yaml(path: str) -> dict:
    """Read a YAML config file as a dict, safely (no code runs), with one ConfigError sentence for a
    missing file, malformed YAML (file, line, column), a key given twice in one mapping, or a file
    that is not a mapping of keys. An empty file gives ``{}``."""
    if not osp.isfile(path):
        raise ConfigError(f"Config file not found: {path!r}. Check --config-file / --dataset-config-file.")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_StrictLoader)  # a SafeLoader subclass: no code runs
    except _DuplicateKey as err:
        raise ConfigError(
            f"Key {err.key!r} appears twice in {path} (lines {err.first.line + 1} and {err.again.line + 1}): "
            "remove one of them (YAML would silently keep the last).") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        context_mark = getattr(err, "context_mark", None)
        if context and context_mark is not None:
            context = f"{context} at line {context_mark.line + 1}"
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"Malformed YAML in {path}{where}: {detail}. Fix the file there.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text file ({err.reason}): pass a YAML config file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a YAML {type(data).__name__}, not a mapping of config keys "
                          "(e.g. `OPTIM:` then `  LR: 0.002` on the next line).")
    return data


def merge_file(cfg: CN, path: str) -> None:
    """Merge a YAML file into ``cfg`` (as yacs' ``merge_from_file``, read by :func:`load_yaml`), with a
    one-line ConfigError for unreadable files, unknown keys and bad values."""
    data = load_yaml(path)
    try:
        cfg.merge_from_other_cfg(CN(data))
    except KeyError as err:
        msg = str(err.args[0]) if err.args else str(err)
        key = msg.split(":", 1)[-1].strip()
        hint = closest_names(key, _all_keys(cfg), n=1)
        suggestion = f" Did you mean {hint[0]}?" if hint else ""
        raise ConfigError(f"Unknown config key {key!r} in {path}.{suggestion}") from None
    except (ValueError, AssertionError) as err:
        raise ConfigError(f"Bad config value in {path}: {err}") from None


UNSEEDED = -1  # SEED value of an unseeded run (results.json records "unseeded")


def check_settings(cfg: CN, training: bool = True) -> None:
    """Refuse settings that would run but record something meaningless, with one ConfigError sentence:
    ``DATASET.NUM_SHOTS`` 0 or below -1, ``SEED`` below -1, and (when ``training``) ``OPTIM.MAX_EPOCH`` < 1."""
    shots = int(cfg.DATASET.NUM_SHOTS)
    if shots == 0 or shots < -1:
        raise ConfigError(f"DATASET.NUM_SHOTS {shots} is not a shot count: give the images per class to train on "
                          "(1, 2, 4, 8, 16, ...) or -1 for the whole train split.")
    seed = int(cfg.SEED)
    if seed < UNSEEDED:
        raise ConfigError(f"SEED {seed} is negative: give a seed of 0 or more, or -1 for an unseeded run.")
    epochs = int(cfg.OPTIM.MAX_EPOCH)
    if training and epochs < 1:
        raise ConfigError(f"OPTIM.MAX_EPOCH {epochs} trains nothing: give 1 or more epochs, or pass --eval-only "
                          "(with --model-dir) to evaluate without training.")
