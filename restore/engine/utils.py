"""Dassl's utility surface: files, seeding, logging tee, meters, checkpoints (atomic, weights-only)."""

from __future__ import annotations

import errno
import json
import os
import os.path as osp
import random
import re
import sys
import tempfile
import time
import warnings
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from restore.log import get_logger
from .registry import check_availability, closest_names
from .serialization import checkpoint_safe_globals, checkpoints_trusted, safe_torch_load, trusted_checkpoints

logger = get_logger(__name__)

__all__ = [
    "mkdir_if_missing", "check_isfile", "read_json", "write_json", "set_random_seed", "read_image",
    "collect_env_info", "listdir_nohidden", "get_most_similar_str_to_a_from_b", "check_availability",
    "tolist_if_not", "Logger", "setup_logger", "AverageMeter", "MetricMeter", "save_checkpoint",
    "load_checkpoint", "resume_from_checkpoint", "open_all_layers", "open_specified_layers",
    "count_num_param", "load_pretrained_weights", "init_network_weights", "atomic_write_bytes",
    "atomic_torch_save", "atomic_write_json", "CheckpointError", "checkpoint_pointer", "resume_advice",
    "trusted_checkpoints", "DiskFullError", "disk_full_error", "error_message",
]


def mkdir_if_missing(dirname: str) -> None:
    """Create ``dirname`` (and parents) if it does not exist."""
    if dirname and not osp.exists(dirname):
        try:
            os.makedirs(dirname)
        except OSError as err:
            if err.errno != errno.EEXIST:
                raise


def check_isfile(fpath: str) -> bool:
    """True if ``fpath`` is a file; warns otherwise (Dassl semantics)."""
    isfile = osp.isfile(fpath)
    if not isfile:
        warnings.warn(f'No file found at "{fpath}"')
    return isfile


def read_json(fpath: str) -> Any:
    with open(fpath, "r") as f:
        return json.load(f)


def write_json(obj: Any, fpath: str) -> None:
    """Write JSON with Dassl's formatting (indent 4), atomically."""
    atomic_write_json(obj, fpath, indent=4)


def _fsync_dir(dirname: str) -> None:
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFullError(OSError):
    """A write that failed for want of space (ENOSPC, EFBIG, EDQUOT); the message names the file."""

    def __str__(self) -> str:
        return (f"Cannot write {self.filename}: {self.strerror}. Free disk space (or raise the file-size limit, "
                "`ulimit -f`) and run again; files written before are intact.")


def disk_full_error(err: BaseException, fpath: str | None = None) -> DiskFullError | None:
    """The DiskFullError naming ``fpath`` (or the error's own file) if ``err`` or an exception it arose from
    is a lack of space; else None. (torch.save reports a full disk as a RuntimeError arising from one.)"""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DiskFullError):
            return cause if fpath is None else DiskFullError(cause.errno, cause.strerror, fpath)
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return DiskFullError(cause.errno, cause.strerror or os.strerror(cause.errno),
                                 fpath or cause.filename or "a file")
        cause = cause.__cause__ or cause.__context__
    return None


def _atomic_write(fpath: str, write: "Callable[[Any], None]") -> None:
    """Call ``write(f)`` on a temporary file beside ``fpath``, fsync it, then rename it over ``fpath``."""
    dirname = osp.dirname(osp.abspath(fpath))
    mkdir_if_missing(dirname)
    fd, tmp = tempfile.mkstemp(prefix="." + osp.basename(fpath) + ".", suffix=".tmp", dir=dirname)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; others sharing the folder must read it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, fpath)
        _fsync_dir(dirname)
    except BaseException as err:
        if osp.exists(tmp):
            os.remove(tmp)
        full = disk_full_error(err, fpath)
        if full is not None:
            raise full from None
        raise


def atomic_write_bytes(data: bytes, fpath: str) -> None:
    """Write ``data`` to ``fpath`` atomically: a kill never leaves half a file."""
    _atomic_write(fpath, lambda f: f.write(data))


def atomic_write_json(obj: Any, fpath: str, indent: int = 2) -> None:
    """Atomically write ``obj`` as JSON."""
    atomic_write_bytes(json.dumps(obj, indent=indent, separators=(",", ": ")).encode() + b"\n", fpath)


def atomic_torch_save(obj: Any, fpath: str) -> None:
    """``torch.save`` through a temporary file + fsync + rename: a kill never leaves half a file."""
    _atomic_write(fpath, lambda f: torch.save(obj, f))


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def read_image(path: str):
    """Read an image as PIL RGB; a missing or corrupted file raises an error naming the path."""
    from PIL import Image, UnidentifiedImageError

    if not osp.exists(path):
        raise FileNotFoundError(f"Image not found: {path}. Check DATASET.ROOT and the dataset layout (DATASETS.md).")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise OSError(
            f"Cannot read image {path} ({err}). The file is corrupted or truncated: re-extract or "
            f"re-download the dataset (DATASETS.md).") from None


def collect_env_info() -> str:
    """A short environment summary (torch's own collector is slow and chatty)."""
    import platform

    import PIL

    lines = [
        f"Python: {platform.python_version()} ({sys.executable})",
        f"PyTorch: {torch.__version__}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    lines.append(f"Pillow ({PIL.__version__})")
    return "\n".join(lines)


def listdir_nohidden(path: str, sort: bool = False) -> list[str]:
    """Entries of ``path`` not starting with '.'; unsorted unless ``sort`` (Dassl semantics)."""
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    if sort:
        items.sort()
    return items


def get_most_similar_str_to_a_from_b(a: str, b: Iterable[str]) -> str:
    hits = closest_names(a, b, n=1)
    return hits[0] if hits else ""


def tolist_if_not(x: Any) -> list:
    return x if isinstance(x, list) else [x]


def _flush_and_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


class Logger:
    """Tee of stdout into a file; ``flush`` fsyncs the file (Dassl semantics)."""

    def __init__(self, fpath: str | None = None, mode: str = "w") -> None:
        self.console = sys.stdout
        self.file = None
        if fpath is not None:
            mkdir_if_missing(osp.dirname(osp.abspath(fpath)))
            self.file = open(fpath, mode, buffering=1)  # line-buffered: a killed run keeps its last lines

    def __del__(self) -> None:
        self.close()

    def write(self, msg: str) -> None:
        self.console.write(msg)
        if self.file is not None:
            self._to_file(lambda f: f.write(msg))

    def flush(self) -> None:
        self.console.flush()
        if self.file is not None:
            self._to_file(_flush_and_sync)

    def _to_file(self, action: Callable[[Any], Any]) -> None:
        """Write to the log; a full disk stops the tee (the console goes on) and raises DiskFullError once."""
        try:
            action(self.file)
        except OSError as err:
            full = disk_full_error(err, self.file.name)
            if full is None:
                raise
            file, self.file = self.file, None
            try:
                file.close()
            except OSError:
                pass
            raise full from None

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()


RESUMED_MARKER = "=== resumed {} ==="


def setup_logger(output: str | None = None, append: bool = False) -> str | None:
    """Tee stdout to ``output/log.txt`` (or ``output`` itself if it ends in .txt/.log and is not a folder).

    An existing log gets a new sibling named with a ``-%Y-%m-%d-%H-%M-%S`` suffix, as Dassl does;
    with ``append`` (train.py resuming an unfinished run) the existing log is continued after a line
    ``=== resumed <time> ===``, so the final ``* accuracy`` lines land in ``log.txt``, the only file
    CoOp's ``parse_test_res.py`` reads. Returns the log file path.
    """
    if output is None:
        return None
    if int(os.environ.get("RANK", "0") or 0) != 0:  # DDP (torchrun): only rank 0 writes the log
        return None
    as_file = output.endswith((".txt", ".log")) and not osp.isdir(output)
    fpath = output if as_file else osp.join(output, "log.txt")
    resumed = append and osp.isfile(fpath)
    if osp.exists(fpath) and not resumed:
        fpath += time.strftime("-%Y-%m-%d-%H-%M-%S")
    if isinstance(sys.stdout, Logger):
        sys.stdout.close()
        sys.stdout = sys.stdout.console
    newline = ""
    if resumed and os.path.getsize(fpath):
        with open(fpath, "rb") as f:
            f.seek(-1, os.SEEK_END)
            newline = "" if f.read(1) == b"\n" else "\n"  # the killed run may have stopped mid-line
    sys.stdout = Logger(fpath, mode="a" if resumed else "w")
    if resumed:
        logger.info(newline + RESUMED_MARKER.format(time.strftime("%Y-%m-%d %H:%M:%S")))
    return fpath


class AverageMeter:
    """Running value/average (optionally exponential)."""

    def __init__(self, ema: bool = False) -> None:
        self.ema = ema
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        if isinstance(val, torch.Tensor):
            val = val.item()
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.val if self.ema and self.count == n else (
            self.avg * 0.9 + self.val * 0.1 if self.ema else self.sum / self.count)


class MetricMeter:
    """A dict of AverageMeters; ``str`` gives ``name val (avg)`` with 4 decimals."""

    def __init__(self, delimiter: str = " ") -> None:
        self.meters: dict[str, AverageMeter] = defaultdict(AverageMeter)
        self.delimiter = delimiter

    def update(self, input_dict: dict[str, Any]) -> None:
        if input_dict is None:
            return
        if not isinstance(input_dict, dict):
            raise TypeError("Input to MetricMeter.update() must be a dictionary")
        for k, v in input_dict.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(v)

    def __str__(self) -> str:
        return self.delimiter.join(f"{name} {m.val:.4f} ({m.avg:.4f})" for name, m in self.meters.items())


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message says why and what to do."""


def save_checkpoint(state: dict[str, Any], save_dir: str, is_best: bool = False,
                    remove_module_from_keys: bool = True, model_name: str = "") -> str:
    """Write ``state`` as ``save_dir/model.pth.tar-<epoch>`` (or ``model_name``) atomically.

    Also rewrites ``save_dir/checkpoint`` with the file's basename, as Dassl does.
    """
    mkdir_if_missing(save_dir)
    if remove_module_from_keys:
        state_dict = state["state_dict"]
        state["state_dict"] = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items())
    fpath = osp.join(save_dir, model_name or f"model.pth.tar-{state['epoch']}")
    atomic_torch_save(state, fpath)
    logger.info(f"Checkpoint saved to {fpath}")
    atomic_write_bytes((osp.basename(fpath) + "\n").encode(), osp.join(save_dir, "checkpoint"))
    if is_best:
        atomic_torch_save(state, osp.join(osp.dirname(fpath), "model-best.pth.tar"))
    return fpath


def load_checkpoint(fpath: str, trust: bool | None = None, corrupted_advice: str = "") -> dict[str, Any]:
    """Load a checkpoint on CPU without running code from it.

    Tensors, plain containers and numbers load, and the objects the original Dassl writes (optimizer
    and LR-scheduler objects, numpy scalars); a file referring to anything else is refused with a
    :class:`CheckpointError` naming it, unless ``trust`` (default: inside
    :func:`~restore.engine.serialization.trusted_checkpoints`, i.e. ``train.py --trust-checkpoint``),
    which unpickles it fully after a warning line. An empty, truncated or non-checkpoint file raises
    a :class:`CheckpointError` calling it corrupted, with ``corrupted_advice`` (default: download it
    again or delete it).
    """
    if fpath is None:
        raise ValueError("File path is None")
    if not osp.exists(fpath):
        raise FileNotFoundError(f'File is not found at "{fpath}"')
    return safe_torch_load(
        fpath, what="a checkpoint", expected="a checkpoint of this library or of Dassl",
        corrupted_advice=corrupted_advice or "download it again or delete it",
        refused_advice="if you trust where the file came from, re-run with --trust-checkpoint to unpickle it fully",
        extra_globals=checkpoint_safe_globals(), trust=checkpoints_trusted() if trust is None else trust,
        error=CheckpointError)


def _saved_checkpoints(fdir: str, but: str = "") -> str:
    """The ``model*`` files in ``fdir`` other than ``but``, by epoch, comma-separated ("" if none)."""
    def order(name: str) -> tuple[int, str]:
        tail = name.rsplit("-", 1)[-1]
        return (int(tail) if tail.isdigit() else -1, name)

    return ", ".join(sorted((n for n in os.listdir(fdir) if n.startswith("model") and n != but), key=order))


def checkpoint_pointer(fdir: str) -> str:
    """The file named in ``fdir/checkpoint`` (the last checkpoint saved there), as a path.

    Raises CheckpointError (one sentence) if the pointer is empty or names a file that is missing.
    """
    pointer = osp.join(fdir, "checkpoint")
    with open(pointer) as f:
        name = f.readline().strip()
    saved = _saved_checkpoints(fdir)
    todo = f"write one of {saved} into it" if saved else "delete it, as that folder holds no checkpoint"
    if not name or name != osp.basename(name):
        held = "is empty" if not name else f"holds {name!r}"
        raise CheckpointError(f"{pointer} should name the last checkpoint saved in {fdir} but {held}: {todo}.")
    fpath = osp.join(fdir, name)
    if not osp.isfile(fpath):
        raise CheckpointError(f"{pointer} names {name}, which is not in {fdir}: {todo}.")
    return fpath


def resume_advice(fpath: str) -> str:
    """What to do with a corrupted checkpoint ``fpath`` that a run resumes from (for :func:`load_checkpoint`)."""
    fdir = osp.dirname(fpath)
    pointer = osp.join(fdir, "checkpoint")
    others = _saved_checkpoints(fdir, but=osp.basename(fpath))
    if others:
        return f"delete it and write one of {others} into {pointer} to resume from there"
    return f"delete it and {pointer} to train from scratch (no earlier checkpoint is left)"


def resume_from_checkpoint(fdir: str, model: nn.Module, optimizer=None, scheduler=None) -> int:
    """Restore model/optimizer/scheduler from the file named in ``fdir/checkpoint``; return its epoch."""
    fpath = checkpoint_pointer(fdir)
    logger.info(f'Loading checkpoint from "{fpath}"')
    checkpoint = load_checkpoint(fpath, corrupted_advice=resume_advice(fpath))
    model.load_state_dict(checkpoint["state_dict"])
    logger.info("Loaded model weights")
    if optimizer is not None and checkpoint.get("optimizer"):
        optimizer.load_state_dict(checkpoint["optimizer"])
        logger.info("Loaded optimizer")
    if scheduler is not None and checkpoint.get("scheduler"):
        scheduler.load_state_dict(checkpoint["scheduler"])
        logger.info("Loaded scheduler")
    start_epoch = checkpoint["epoch"]
    logger.info(f"Previous epoch: {start_epoch}")
    return start_epoch


def open_all_layers(model: nn.Module) -> None:
    model.train()
    for p in model.parameters():
        p.requires_grad = True


def open_specified_layers(model: nn.Module, open_layers: str | list[str]) -> None:
    open_layers = tolist_if_not(open_layers)
    for layer in open_layers:
        if not hasattr(model, layer):
            raise AttributeError(f"{layer} is not an attribute of the model")
    for name, module in model.named_children():
        trainable = name in open_layers
        module.train(trainable)
        for p in module.parameters():
            p.requires_grad = trainable


def count_num_param(model: nn.Module | None = None, params: Iterable[torch.Tensor] | None = None) -> int:
    if model is not None:
        return sum(p.numel() for p in model.parameters())
    if params is not None:
        return sum(p.numel() for p in params)
    raise ValueError("model and params must not both be None")


def load_pretrained_weights(model: nn.Module, weight_path: str) -> None:
    """Load the name- and shape-matching entries of a checkpoint into ``model`` (Dassl semantics)."""
    checkpoint = load_checkpoint(weight_path)
    state_dict = checkpoint.get("state_dict", checkpoint)
    model_dict = model.state_dict()
    new_state, matched, discarded = OrderedDict(), [], []
    for k, v in state_dict.items():
        k = k[7:] if k.startswith("module.") else k
        if k in model_dict and model_dict[k].size() == v.size():
            new_state[k] = v
            matched.append(k)
        else:
            discarded.append(k)
    model_dict.update(new_state)
    model.load_state_dict(model_dict)
    if not matched:
        warnings.warn(f'The pretrained weights "{weight_path}" cannot be loaded, please check the key names manually')
    else:
        logger.info(f'Successfully loaded pretrained weights from "{weight_path}"')
        if discarded:
            logger.info(f"Layers discarded due to unmatched keys or size: {discarded}")


def init_network_weights(model: nn.Module, init_type: str = "normal", gain: float = 0.02) -> None:
    def _init(m: nn.Module) -> None:
        if hasattr(m, "weight") and isinstance(m, (nn.Linear, nn.Conv2d)):
            {"normal": lambda w: nn.init.normal_(w, 0.0, gain),
             "xavier": lambda w: nn.init.xavier_normal_(w, gain=gain),
             "kaiming": lambda w: nn.init.kaiming_normal_(w, a=0, mode="fan_in"),
             "orthogonal": lambda w: nn.init.orthogonal_(w, gain=gain)}[init_type](m.weight.data)
            if m.bias is not None:
                nn.init.constant_(m.bias.data, 0.0)
    model.apply(_init)


_WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def error_message(err: BaseException) -> str:
    """The sentence to print for ``err``: a KeyError's text without repr quotes, the original error of a
    DataLoader worker (torch wraps it in the worker's traceback), a full disk naming the file."""
    full = disk_full_error(err)
    if full is not None:
        return str(full)
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err)
    if _WORKER_ERROR.match(text):
        # the last exception of the chain: after the last traceback header, past its indented frame lines
        lines = text[text.rindex("Traceback (most recent call last):"):].splitlines()[1:]
        while lines and (not lines[0] or lines[0][0].isspace()):
            lines = lines[1:]
        if lines:
            text = re.sub(r"^[\w.]+: ", "", "\n".join(lines).strip(), count=1)
    return text
