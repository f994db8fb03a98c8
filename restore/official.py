"""Running a method's official code (a local checkout, never copied here) on this engine, for parity.

* :func:`official_shims` installs, for one process, what the official code needs on a current
  PyTorch without network: its CLIP download returns a local weights file; ``Tensor.half`` and
  ``Module.half`` become no-ops (``fp32=True``: the official MaPLe / MaPLe_FSA code halves some
  layers unconditionally and fails in fp32 otherwise); ``.cuda()`` is a no-op without a GPU; and,
  for the real Dassl, the LR scheduler ``verbose`` argument, ``torch.load(weights_only=False)`` and
  stubs for ``wilds``/``pandas``/``gdown``/tensorboard on its import chain.
* :func:`build_official_trainer` builds the official trainer (its own ``train.py``'s config
  assembly, then ``build_trainer``) from a checkout on a weights file, without training: the
  reusable "official model" for comparisons and benchmarks.
* :func:`run_official` runs the official ``train.py`` as its ``__main__`` would, recording every
  batch's loss summary at full precision (:func:`record_losses`).
* :class:`OfficialRun`: what a method states, beside its trainer, about its official code.
* :func:`write_parity_clip`: the small random ViT-B/32-shaped CLIP used for parity runs.

The parity CLIP (:data:`PARITY_CLIP`): OpenAI's ViT-B/32 widths (vision 768 with 12 heads, text
512 with 8 heads, embedding 512, the real vocabulary and context length 77; the official MaPLe /
RESTORE code hard-codes 512 and 768), 3 layers per tower (deep-prompt depths are set to 3 on both sides), 32 px input (one patch), weights drawn by
``CLIP(PARITY_CLIP)``'s own initialisation after ``torch.manual_seed(seed)`` (default 0) and saved
as a plain state dict in OpenAI's key layout.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import logging
import os
import os.path as osp
import runpy
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from restore.clip.model import CLIP, CLIPConfig
from restore.prompting.official import OfficialKeys

__all__ = ["PARITY_CLIP", "OfficialRun", "build_official_trainer", "official_root", "official_shims", "record_logits",
           "record_losses", "run_official", "write_parity_clip"]

logger = logging.getLogger(__name__)

PARITY_CLIP = CLIPConfig(
    embed_dim=512, image_resolution=32, vision_layers=3, vision_width=768, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=3,
    vision_heads=12,
)


@dataclass(frozen=True)
class OfficialRun:
    """How to run a method's official code for parity, declared beside the method's trainer.

    Attributes:
        repo: the official GitHub repository (``owner/name``).
        trainer: the trainer name the official code registers.
        config: the official config file, relative to the checkout.
        ours: our trainer's registered name.
        our_config: our config file for the same settings (relative to our repository).
        opts: extra ``KEY VALUE`` opts given to both runs (the same values on each side).
        official_opts: opts for the official run only (its own key names for the same values; ``--flag
            value`` pairs go to its ``train.py``'s own flags).
        our_opts: opts for our run only (our key names; switches reproducing official quirks).
        keys: how the official checkpoint names the learned tensors (the model's ``official_keys``).
    """

    repo: str
    trainer: str
    config: str
    ours: str
    our_config: str
    opts: Sequence[str] = ()
    official_opts: Sequence[str] = ()
    our_opts: Sequence[str] = ()
    keys: OfficialKeys = ()


def write_parity_clip(path: str, seed: int = 0, config: CLIPConfig = PARITY_CLIP) -> str:
    """Write the parity CLIP's weights (see the module docstring) to ``path``; returns ``path``."""
    from restore.clip.loader import save_openai_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(config)
    save_openai_state_dict(model, path)
    return path


# --------------------------------------------------------------------------- shims


def _stub_module(name: str, **attrs: Any) -> None:
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__dict__.update(attrs)
    module.__path__ = []  # type: ignore[attr-defined]  # a package, so submodule stubs can hang below it
    sys.modules[name] = module


def _real_dassl_stubs() -> None:
    """Modules the real Dassl imports at import time that a parity run does not need."""

    class _Writer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __getattr__(self, name: str) -> Callable[..., None]:
            return lambda *args, **kwargs: None

    for name in ("wilds", "wilds.datasets", "wilds.datasets.wilds_dataset", "gdown"):
        _stub_module(name, WILDSDataset=object, get_dataset=None, download=None)
    # pandas: other libraries probe ``pandas.DataFrame`` once it is in sys.modules, so a stub only
    # carries the names they look for
    _stub_module("pandas", DataFrame=type("DataFrame", (), {}), Series=type("Series", (), {}), __version__="0")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        _stub_module("torch.utils.tensorboard", SummaryWriter=_Writer)


def _is_code_root(folder: str) -> bool:
    """A CoOp-style official code root: its ``train.py`` beside the ``clip`` package it imports."""
    return osp.isfile(osp.join(folder, "train.py")) and osp.isfile(osp.join(folder, "clip", "clip.py"))


def official_root(checkout: str) -> str:
    """The folder of ``checkout`` holding the official ``train.py`` and ``clip/``: the checkout itself
    or, for a repository that keeps its code one level down (KgCoOp's ``KgCoOp/``), its one such subfolder."""
    checkout = osp.abspath(checkout)
    if _is_code_root(checkout):
        return checkout
    if not osp.isdir(checkout):
        raise FileNotFoundError(f"{checkout} is not a folder: give a local checkout of the method's official "
                                "repository.")
    inner = sorted(d for d in os.listdir(checkout) if _is_code_root(osp.join(checkout, d)))
    if len(inner) == 1:
        logger.info(f"Official code: {checkout}/{inner[0]} (the folder of the checkout holding train.py)")
        return osp.join(checkout, inner[0])
    where = f" (its subfolders {', '.join(inner)} each have them: give one of them)" if inner else ""
    raise FileNotFoundError(f"{checkout} has no train.py beside a clip/ package{where}: give the root of the "
                            "method's official checkout.")


@contextlib.contextmanager
def official_shims(checkout: str, weights: str, fp32: bool = True, real_dassl: str | None = None) -> Iterator[None]:
    """Let the official code in ``checkout`` run here: see the module docstring for each shim.

    ``real_dassl``: a checkout of KaiyangZhou/Dassl.pytorch to import as ``dassl`` (default: this
    engine, through the ``dassl`` alias).
    """
    checkout, weights = osp.abspath(checkout), osp.abspath(weights)
    if not _is_code_root(checkout):
        raise FileNotFoundError(f"{checkout} has no train.py beside a clip/ package: give the root of an official "
                                "checkout.")
    if not osp.isfile(weights):
        raise FileNotFoundError(f"CLIP weights file {weights} not found (write one with python -m restore.parity "
                                "--write-clip FILE).")
    saved_path = list(sys.path)
    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    try:
        sys.path.insert(0, checkout)
        if real_dassl:
            sys.path.insert(0, osp.abspath(real_dassl))
            _real_dassl_stubs()
            original_load = torch.load
            patch(torch, "load", lambda *a, **k: original_load(*a, **{**k, "weights_only": False}))
            import torch.optim.lr_scheduler as sched

            for cls_name in ("_LRScheduler", "LRScheduler"):
                base = getattr(sched, cls_name, None)
                if base is not None and "_parity_shim" not in base.__init__.__dict__:
                    init = base.__init__

                    def no_verbose(self: Any, optimizer: Any, last_epoch: int = -1, verbose: Any = None,
                                   _init: Any = init) -> None:
                        _init(self, optimizer, last_epoch)

                    no_verbose._parity_shim = True  # type: ignore[attr-defined]
                    patch(base, "__init__", no_verbose)
        else:
            import restore.dassl_alias as alias

            alias.activate()
        import clip.clip as official_clip  # the checkout's own package

        patch(official_clip, "_download", lambda url, root=None, **kwargs: weights)
        if fp32:
            patch(torch.Tensor, "half", lambda self, *args, **kwargs: self)
            patch(nn.Module, "half", lambda self: self)
        if not torch.cuda.is_available():
            patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
            patch(nn.Module, "cuda", lambda self, *args, **kwargs: self)
        yield
    finally:
        for owner, name, value in reversed(patches):
            setattr(owner, name, value)
        sys.path[:] = saved_path


# --------------------------------------------------------------------------- running


def _engine_classes(modules: Sequence[str], name: str) -> list[Any]:
    """The class ``name`` of each engine among ``modules`` already imported (ours, the real Dassl's)."""
    found: list[Any] = []
    for module_name in modules:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name) and getattr(module, name) not in found:
            found.append(getattr(module, name))
    return found


@contextlib.contextmanager
def _wrapped(classes: Sequence[Any], attr: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """Replace method ``attr`` of each class by ``wrap(original)`` for the duration; put it back after."""
    originals = [(cls, getattr(cls, attr)) for cls in classes]
    for cls, original in originals:
        setattr(cls, attr, wrap(original))
    try:
        yield
    finally:
        for cls, original in originals:
            setattr(cls, attr, original)


@contextlib.contextmanager
def record_losses(path: str | None) -> Iterator[list[dict[str, Any]]]:
    """Record every ``forward_backward`` summary (full-precision floats) of any TrainerX; written as
    JSON (``[{"epoch", "batch", **summary}]``) to ``path`` when given, on exit."""
    records: list[dict[str, Any]] = []
    classes = _engine_classes(("restore.engine.trainer", "dassl.engine.trainer"), "TrainerX")

    def wrap(run_epoch: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def run(self: Any) -> Any:
            step = self.forward_backward

            def recorded(batch: Any) -> Any:
                summary = step(batch)
                records.append({"epoch": int(self.epoch), "batch": int(self.batch_idx),
                                **{k: float(v) for k, v in summary.items()}})
                return summary

            self.forward_backward = recorded
            try:
                return run_epoch(self)
            finally:
                del self.forward_backward
        return run

    with _saved_on_exit(records, path), _wrapped(classes, "run_epoch", wrap):
        yield records


@contextlib.contextmanager
def _saved_on_exit(records: list[Any], path: str | None) -> Iterator[None]:
    """Write ``records`` as JSON to ``path`` (when given) on leaving the block, whatever ends it."""
    try:
        yield
    finally:
        if path:
            with open(path, "w") as f:
                json.dump(records, f)


@contextlib.contextmanager
def record_logits(path: str | None) -> Iterator[list[list[float]]]:
    """Record every batch of model outputs an evaluator receives (``process(mo, gt)``), as rows of
    floats; written as JSON to ``path`` when given, on exit."""
    rows: list[list[float]] = []
    classes = _engine_classes(("restore.engine.evaluator", "dassl.evaluation.evaluator"), "EvaluatorBase")
    targets = [sub for cls in classes for sub in (cls, *cls.__subclasses__()) if "process" in vars(sub)]

    def wrap(process: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(self: Any, mo: torch.Tensor, gt: torch.Tensor) -> Any:
            rows.extend(mo.detach().float().cpu().tolist())
            return process(self, mo, gt)
        return recorded

    with _saved_on_exit(rows, path), _wrapped(targets, "process", wrap):
        yield rows


def build_official_trainer(checkout: str, argv: Sequence[str], weights: str, fp32: bool = True,
                           real_dassl: str | None = None) -> Any:
    """The official trainer of ``checkout`` built for ``argv`` (its ``train.py`` flags) on ``weights``.

    Runs the official ``train.py`` with ``--no-train`` (its config assembly, seeding and
    ``build_trainer``: data loaders, model, optimizer) and returns the trainer, untrained. The
    shims stay installed for the rest of the process (the official modules rely on them).
    """
    built: list[Any] = []
    shims = official_shims(checkout, weights, fp32=fp32, real_dassl=real_dassl)
    shims.__enter__()
    import dassl.engine as engine

    original = engine.build_trainer

    def capture(cfg: Any) -> Any:
        built.append(original(cfg))
        return built[-1]

    engine.build_trainer = capture
    try:
        _run_main(checkout, [*argv, "--no-train"])
    finally:
        engine.build_trainer = original
    if not built:
        raise RuntimeError(f"{checkout}/train.py built no trainer for {' '.join(argv)}")
    return built[0]


def _run_main(checkout: str, argv: Sequence[str]) -> None:
    saved_argv, saved_cwd = list(sys.argv), os.getcwd()
    sys.argv = [osp.join(checkout, "train.py"), *argv]
    os.chdir(checkout)
    try:
        runpy.run_path(osp.join(checkout, "train.py"), run_name="__main__")
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)


def run_official(checkout: str, argv: Sequence[str], weights: str, fp32: bool = True,
                 real_dassl: str | None = None, losses: str | None = None, logits: str | None = None) -> None:
    """Run the official ``train.py`` of ``checkout`` with ``argv`` as its ``__main__`` would; every
    batch's loss summary goes to the JSON file ``losses`` (:func:`record_losses`), every evaluated
    output row to ``logits`` (:func:`record_logits`)."""
    with official_shims(checkout, weights, fp32=fp32, real_dassl=real_dassl):
        import dassl.engine.trainer  # noqa: F401  (so the recorders see its classes)
        import dassl.evaluation  # noqa: F401

        with record_losses(losses), record_logits(logits):
            _run_main(checkout, argv)
