"""Speed and memory of every registered trainer, with and without the library's exact speed-ups.

    python -m restore.benchmark [--quick] [--json FILE] [--md FILE] [--device cpu|cuda]
                                [--trainers CoOp MaPLe ...] [--classes 47 1000] [--reps N] [--no-memory]
    python -m restore.benchmark --official DIR [--trainers ...] [--classes 47 100] [--mha]

With ``--official DIR`` (a local checkout of a method's official code) the baseline is the official
code itself, built and checked for agreement on the same weights and parameters, timed side by side:
see :mod:`restore.benchmark_official`. Without it, the baseline below is an EMULATION of the
per-paper code, labelled so in every table (:data:`EMULATION_OFFSET` states what it is worth).

For each registered trainer (plugins loaded; a method with nothing to train is only evaluated) and
each class count (47 = DTD, 1000 = ImageNet) it builds the trainer's own model with
``build_model`` on a CLIP of ViT-B/16 size with RANDOM weights (no download, no dataset; class
names are synthetic, 1-4 words each, so prompt token lengths look like real ones), and measures

* training: ms per image and peak memory at batch 4 (the trainer's own ``forward_backward``:
  its losses, precision and optimiser step);
* evaluation: images/s at batch 100 (the trainer's ``inference_context`` + ``model_inference``;
  with the cache the class text features are computed once on entering the context, untimed, as
  they are amortised over a whole test set).

The same run measures the plain path (the emulation), the way the original code bases run, with the speed-ups
switched off by :func:`speedups` (a context manager, not a config key), in alternation with the
fast path (medians of paired rounds, so load drift on a shared machine hits both alike):

* ``truncate=False``: the text tower runs all 77 positions instead of stopping at the longest EOT
  (exact: under the causal mask nothing after EOT reaches it);
* ``cache=False``: class text features recomputed for every evaluation batch instead of once per
  evaluation (exact for every method whose text side does not depend on the image);
* precision (CUDA only): frozen CLIP in the working precision of ``PREC auto`` (bf16 where
  supported, else fp16) with fp32 learnable parameters vs everything fp32
  (``precision_speedup_train_1000``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU an estimate of it, every tensor
alive during one training step counted by :class:`LiveTensorMemory` with the GPU's bf16 working
precision reproduced on the CPU (:func:`measure_memory_cpu`).

Headline keys of the JSON: ``text_speedup_1000`` (the reference method's text tower forward+backward
over 1000 classes, untruncated / truncated time; the reference is the method whose spec sets
``extras["benchmark_reference"]``), ``eval_speedup_1000`` (its evaluation images/s, cached and
truncated text / the plain path of per-batch untruncated text; ``eval_cache_only_speedup_1000``
isolates the cache and ``eval_cache_flop_ratio_1000`` is what caching saves by FLOP count), and for
each method whose spec sets ``extras["benchmark_pair"]`` (a baseline and variants):
``<key>_vs_<baseline>_step`` (its training step / the baseline's) and ``<key>_<variant>_mode_overhead``
(a variant's step / the default step). A ratio is ``null`` when its trainer is not registered or
failed (the reason is in ``notes``).

``--quick`` (a few minutes on 2 CPU cores): 100 instead of 1000 classes (the ``*_1000`` keys are
then measured at 100 classes, see ``large_num_classes``), fewer repetitions, evaluation batch 25,
and on CPU a narrower CLIP (same depth, 224 px, patch 32, widths 192/128); all of it is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import math
import os
import platform
import random
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from restore.clip.model import CLIP, TINY_CONFIG, CLIPConfig
from restore.engine.utils import atomic_write_json
from restore.methods import find_method, list_methods, load_plugins
from restore.prompting.encoders import PromptedTextEncoder
from restore.prompting.trainer import PromptModel, PromptTrainer, resolve_precision

__all__ = ["speedups", "VIT_B16_CONFIG", "QUICK_CPU_CONFIG", "synthetic_classnames", "run_benchmark", "main"]

VIT_B16_CONFIG = CLIPConfig(
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
# --quick on CPU: ViT-B/16's depth, input size and vocabulary, narrower and with 32 px patches.
QUICK_CPU_CONFIG = CLIPConfig(
    embed_dim=128, image_resolution=224, vision_layers=12, vision_width=192, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2, transformer_layers=12,
    vision_heads=3)

#: What the emulated per-paper path (``speedups(truncate=False, cache=False)``) is worth against the
#: real official code, measured side by side (python -m restore.benchmark --official DIR).
EMULATION_OFFSET = ("measured side by side with the official code (ViT-B/16 size, random weights, fp32, 2-core CPU, "
                    "batch 4, 47 classes) the emulation's training step is 10-18 % slower than the official code's "
                    "(official / emulation step time 0.82-0.91 for two deep-prompt methods), so speed-ups against it "
                    "overstate the gain over the official code; `--official DIR` measures against the real code.")



def _eval_only(name: str) -> bool:
    """Methods with nothing to train (their spec says ``trains=False``) are only evaluated."""
    spec = find_method(name)
    return spec is not None and not spec.trains


def _reference_trainer(names: Sequence[str]) -> str | None:
    """The method whose spec marks it the benchmark's text-tower / precision reference (``extras``)."""
    for spec in list_methods():
        if spec.extras.get("benchmark_reference") and spec.trainer in names:
            return spec.trainer
    return None


# ------------------------------------------------------------------------------ switches


@contextlib.contextmanager
def speedups(truncate: bool = True, cache: bool = True) -> Iterator[None]:
    """Switch the library's exact speed-ups off for a measurement (the plain path of the original code).

    ``truncate=False``: every :class:`PromptedTextEncoder` runs the full 77-token context.
    ``cache=False``: :meth:`PromptModel.inference_cache` caches nothing, so each evaluation batch
    recomputes the class text features. Both are patched on the classes for the duration of the
    block, so every trainer is affected without duplicating model code.
    """
    saved: list[tuple[type, str, Any]] = []
    if not truncate:
        original_forward = PromptedTextEncoder.forward

        def forward_untruncated(self: PromptedTextEncoder, *args: Any, **kwargs: Any) -> Any:
            kwargs["truncate"] = False
            return original_forward(self, *args, **kwargs)

        saved.append((PromptedTextEncoder, "forward", original_forward))
        PromptedTextEncoder.forward = forward_untruncated  # type: ignore[method-assign]
    if not cache:
        saved.append((PromptModel, "inference_cache", PromptModel.inference_cache))

        @contextlib.contextmanager
        def no_cache(self: PromptModel) -> Iterator[None]:
            yield

        PromptModel.inference_cache = no_cache  # type: ignore[method-assign]
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def mha_attention() -> Iterator[None]:
    """Run every :class:`restore.clip.model.Attention` through ``nn.MultiheadAttention(batch_first=True)``
    (sharing its parameters) for the duration of the block: the attention before the fused version,
    to measure what the fused one gains."""
    from torch import nn

    from restore.clip.model import Attention

    original = Attention.forward

    def forward(self: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mha = self.__dict__.get("_mha")
        if mha is None:
            mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, batch_first=True,
                                        device=self.in_proj_weight.device, dtype=self.in_proj_weight.dtype)
            mha.in_proj_weight, mha.in_proj_bias = self.in_proj_weight, self.in_proj_bias
            mha.out_proj = self.out_proj  # type: ignore[assignment]
            self.__dict__["_mha"] = mha  # not a submodule: state dict and parameters unchanged
        mha.train(self.training)
        return mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]

    Attention.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        Attention.forward = original  # type: ignore[method-assign]


# ------------------------------------------------------------------------------ helpers

_WORDS = ("red", "great", "white", "shark", "golden", "retriever", "sports", "car", "wooden", "spoon", "tree",
          "frog", "house", "finch", "snow", "leopard", "garden", "spider", "electric", "guitar", "paper", "towel",
          "mountain", "bike", "brown", "bear", "water", "ouzel", "american", "lobster", "steel", "drum", "monarch",
          "butterfly", "lesser", "panda", "crash", "helmet", "rock", "beauty", "sea", "anemone", "black", "swan",
          "hot", "pot", "wall", "clock", "toy", "terrier", "barn", "spider", "web", "king", "penguin", "bell")


def synthetic_classnames(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct names of 1-4 words (about 1-6 BPE tokens, like ImageNet's names)."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = rng.choices((1, 2, 3, 4), weights=(0.35, 0.4, 0.18, 0.07))[0]
        name = " ".join(rng.choice(_WORDS) for _ in range(k))
        if name in seen:
            name = f"{name} {len(names)}"
        seen.add(name)
        names.append(name)
    return names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Mode = tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], Any]]


def _paired(modes: dict[str, Mode], device: torch.device, warmup: int,
            rounds: int, samples: dict[str, list[float]] | None = None) -> dict[str, tuple[float, float | None]]:
    """Per mode ``(context, fn)``: median seconds per call and peak MiB (CUDA; None on CPU).

    The modes are measured in alternation, one timed call of each per round, each round inside a
    fresh ``context()`` (e.g. :func:`speedups` or an inference context), so load drift on a shared
    machine hits every mode alike and the ratios stay meaningful. ``warmup`` untimed calls open each
    mode's first round. ``samples``, when given, receives every round's seconds per mode.
    """
    times: dict[str, list[float]] = {k: [] for k in modes}
    peaks: dict[str, float | None] = {k: None for k in modes}
    _free(device)
    for round_index in range(max(rounds, 1)):
        for key, (context, fn) in modes.items():
            with context():
                for _ in range(warmup if round_index == 0 else 0):
                    fn()
                _sync(device)
                _peak_reset(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[key].append(time.perf_counter() - start)
                peak = _peak_mib(device)
                if peak is not None:
                    peaks[key] = max(peak, peaks[key] or 0.0)
    if samples is not None:
        samples.update(times)
    return {k: (sorted(v)[len(v) // 2], peaks[k]) for k, v in times.items()}


def _cpu_name() -> str:
    """The CPU model (``model name`` of /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _plain() -> contextlib.AbstractContextManager:
    return speedups(truncate=False, cache=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset; None on CPU (no reliable per-step figure)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None


def _ratio(slow: float | None, fast: float | None) -> float | None:
    if slow is None or fast is None or fast <= 0 or not math.isfinite(slow):
        return None
    return round(slow / fast, 3)


@dataclass
class Preset:
    name: str
    config: CLIPConfig
    class_counts: tuple[int, int]
    train_batch: int = 4
    eval_batch: int = 100
    train_warmup: int = 2
    train_reps: int = 5
    eval_warmup: int = 1
    eval_reps: int = 3
    text_reps: int = 3
    notes: list[str] = field(default_factory=list)


def make_preset(quick: bool, device: torch.device, tiny: bool = False) -> Preset:
    if tiny:  # hidden: tests
        return Preset("tiny", TINY_CONFIG, (5, 12), train_batch=2, eval_batch=4, train_warmup=1, train_reps=1,
                      eval_warmup=0, eval_reps=1, text_reps=1, notes=["tiny test preset (TINY_CONFIG, 5/12 classes)"])
    if not quick:
        return Preset("full", VIT_B16_CONFIG, (47, 1000))
    if device.type == "cuda":
        return Preset("quick", VIT_B16_CONFIG, (47, 100), eval_batch=100, train_warmup=1, train_reps=3,
                      eval_warmup=1, eval_reps=2, text_reps=2,
                      notes=["--quick: 100 instead of 1000 classes; *_1000 keys measured at 100 classes"])
    return Preset("quick", QUICK_CPU_CONFIG, (47, 100), eval_batch=25, train_warmup=1, train_reps=2,
                  eval_warmup=0, eval_reps=1, text_reps=2,
                  notes=["--quick on CPU: narrower CLIP (ViT-B/16 depth and 224 px input, patch 32, vision width "
                         "192, text width 128) - NOT ViT-B/16 size", "--quick: 100 instead of 1000 classes; "
                         "*_1000 keys measured at 100 classes", "--quick on CPU: evaluation batch 25 instead of 100"])


# ------------------------------------------------------------------------------ building a trainer


def build_bench_trainer(name: str, clip_model: CLIP, classnames: Sequence[str], device: torch.device,
                        precision: str | None = None, overrides: dict[str, Any] | None = None) -> PromptTrainer:
    """The registered trainer ``name`` with its own ``build_model`` on ``clip_model`` (a copy), no dataset."""
    from restore.engine.config import extend_cfg, get_cfg_default
    from restore.engine.registry import TRAINER_REGISTRY

    cls = TRAINER_REGISTRY.get(name)
    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.TRAINER.NAME = name
    cfg.USE_CUDA = device.type == "cuda"
    cfg.DATASET.NAME = "ImageNet"
    cfg.OUTPUT_DIR = ""
    res = clip_model.visual.input_resolution
    cfg.INPUT.SIZE = (res, res)
    node = cfg.TRAINER[cls.cfg_node_name()]
    if precision is not None:
        node.PREC = precision
    for key, value in (overrides or {}).items():
        node[key] = value
    trainer = bare_trainer(cls, cfg, classnames, device)
    trainer.load_backbone = lambda: copy.deepcopy(clip_model)  # type: ignore[method-assign]
    with _quiet():
        trainer.build_model()
    if device.type != "cuda" and precision == "bf16":
        emulate_working_precision(trainer, torch.bfloat16)
    return trainer


def bare_trainer(cls: Any, cfg: Any, classnames: Sequence[str], device: torch.device) -> Any:
    """An instance of the trainer class ``cls`` (ours or an official one on this engine) with ``cfg``,
    ``device`` and a dataset of ``classnames`` only (no data loaders), before ``build_model``."""
    from restore.engine.trainer import TrainerBase

    trainer = cls.__new__(cls)
    TrainerBase.__init__(trainer)
    trainer.cfg = cfg
    trainer.check_cfg(cfg)
    trainer.device = device
    trainer.output_dir = ""
    trainer.start_epoch = trainer.epoch = 0
    trainer.max_epoch = cfg.OPTIM.MAX_EPOCH
    trainer.batch_idx, trainer.num_batches = 0, 10**9
    trainer.loaded_epoch = None
    trainer.train_images, trainer.train_seconds = 0, 0.0
    trainer.num_classes = len(classnames)
    trainer.lab2cname = dict(enumerate(classnames))
    dataset = SimpleNamespace(classnames=list(classnames), num_classes=len(classnames), lab2cname=trainer.lab2cname)
    trainer.dm = SimpleNamespace(dataset=dataset, num_classes=len(classnames), lab2cname=trainer.lab2cname)
    return trainer


def emulate_working_precision(trainer: PromptTrainer, dtype: torch.dtype) -> None:
    """Put a CPU trainer on the GPU path of ``PREC bf16``: frozen CLIP in ``dtype``, learnable tensors
    fp32, every forward under autocast (CPU autocast; trainers themselves run fp32 on CPU)."""
    trainer.apply_precision("bf16" if dtype == torch.bfloat16 else "fp16", dtype)


def _batch(n: int, num_classes: int, resolution: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"img": torch.randn(n, 3, resolution, resolution, generator=g).to(device),
            "label": torch.randint(0, num_classes, (n,), generator=g).to(device),
            "domain": torch.zeros(n, dtype=torch.long, device=device)}


def _train_step(trainer: PromptTrainer, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        with _quiet():
            trainer.forward_backward(batch)
            trainer.batch_idx = 0

    return step


def _ms_per_image(seconds: float, batch: dict[str, torch.Tensor]) -> float:
    return round(1000.0 * seconds / batch["img"].shape[0], 3)


def compare_train_steps(trainers: dict[str, PromptTrainer], batch: dict[str, torch.Tensor], device: torch.device,
                        warmup: int, rounds: int) -> dict[str, tuple[float, float | None]]:
    """(ms per image, peak MiB) of several trainers' ``forward_backward`` on one batch, in alternation."""
    for trainer in trainers.values():
        trainer.set_model_mode("train")
    paired = _paired({k: (contextlib.nullcontext, _train_step(t, batch)) for k, t in trainers.items()},
                     device, warmup, rounds)
    return {k: (_ms_per_image(seconds, batch), peak) for k, (seconds, peak) in paired.items()}


def measure_train(trainer: PromptTrainer, batch: dict[str, torch.Tensor], device: torch.device, warmup: int,
                  reps: int) -> dict[str, Any]:
    """ms per image and peak MiB (CUDA) of the trainer's ``forward_backward``, fast and plain, paired."""
    trainer.set_model_mode("train")
    step = _train_step(trainer, batch)
    paired = _paired({"fast": (contextlib.nullcontext, step), "plain": (_plain, step)}, device, warmup, reps)
    row = {"train_ms_per_image": _ms_per_image(paired["fast"][0], batch),
           "train_ms_per_image_plain": _ms_per_image(paired["plain"][0], batch),
           "peak_memory_mib": paired["fast"][1], "peak_memory_mib_plain": paired["plain"][1]}
    row["train_speedup"] = _ratio(row["train_ms_per_image_plain"], row["train_ms_per_image"])
    return row


def measure_eval(trainer: PromptTrainer, batch: dict[str, torch.Tensor], device: torch.device, warmup: int,
                 reps: int, per_batch_text: bool = False) -> dict[str, Any]:
    """Images/s of the trainer's evaluation path (``inference_context`` + ``model_inference``), fast
    and plain, paired. The fast path's class text features are computed on entering the context,
    untimed: they are amortised over a whole test set. ``per_batch_text`` adds a third mode in the
    same rounds: truncated text recomputed per batch (isolates the cache)."""
    trainer.set_model_mode("eval")
    images = batch["img"]

    def context(outer: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], contextlib.ExitStack]:
        def enter() -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            stack.enter_context(_quiet())
            stack.enter_context(torch.no_grad())
            stack.enter_context(outer())
            stack.enter_context(trainer.inference_context())
            return stack

        return enter

    def infer() -> None:
        trainer.model_inference(images)

    modes = {"fast": (context(contextlib.nullcontext), infer), "plain": (context(_plain), infer)}
    if per_batch_text:
        modes["per_batch_text"] = (context(lambda: speedups(cache=False)), infer)
    paired = _paired(modes, device, warmup, reps)
    per_s = {k: round(images.shape[0] / seconds, 2) for k, (seconds, _) in paired.items()}
    row: dict[str, float | None] = {"eval_images_per_s": per_s["fast"], "eval_images_per_s_plain": per_s["plain"]}
    row["eval_speedup"] = _ratio(row["eval_images_per_s"], row["eval_images_per_s_plain"])
    if per_batch_text:
        row["eval_images_per_s_per_batch_text"] = per_s["per_batch_text"]
    return row


class LiveTensorMemory(TorchDispatchMode):
    """Current and peak bytes of the tensor storages alive while the mode is active, on any device.

    Every operator's outputs are recorded by storage (views and in-place results count once) and
    released when the storage is freed, so ``peak`` is what an allocator without slack would need:
    weights, gradients, optimiser state, activations saved for backward and temporaries.
    ``existing`` are tensors alive before the block (parameters, buffers, optimiser state).
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        for tensor in existing:
            self._track(tensor)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live or tensor.device.type == "meta":
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


def _state_tensors(trainer: PromptTrainer) -> list[torch.Tensor]:
    tensors = [t for t in trainer.model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    if trainer.optim is not None:
        tensors += [v for state in trainer.optim.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def measure_memory_cpu(trainer: PromptTrainer, batch: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Peak tensor memory (MiB) of one training step on CPU in a GPU working precision, fast and plain.

    The GPU path of ``PREC auto``/``bf16`` (frozen CLIP in ``dtype``, learnable tensors fp32, autocast)
    is reproduced on the CPU, and every tensor alive during the step is counted by
    :class:`LiveTensorMemory`: an estimate of ``torch.cuda.max_memory_allocated`` without the CUDA
    context, allocator slack or kernel workspaces. The trainer is left in ``dtype``.
    """
    emulate_working_precision(trainer, dtype)
    trainer.set_model_mode("train")
    step = _train_step(trainer, batch)
    peaks: dict[str, float] = {}
    for key, context in (("fast", contextlib.nullcontext), ("plain", _plain)):
        with context():
            step()  # the optimiser state exists from here on, as in a steady-state step
            gc.collect()
            with LiveTensorMemory(_state_tensors(trainer)) as tracker:
                step()
            peaks[key] = round(tracker.peak / 2**20, 1)
    return peaks


def eval_cache_flop_ratio(config: CLIPConfig, eval_batch: int, num_classes: int) -> float:
    """What caching the class text features saves in evaluation arithmetic (a FLOP ratio).

    (image tower over ``eval_batch`` images + untruncated text tower over ``num_classes`` prompts)
    / image tower, counted by ``torch.utils.flop_counter`` on meta tensors (no compute). With the
    text features cached, evaluation costs the image tower alone.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = CLIP(config)
    images = torch.empty(eval_batch, 3, config.image_resolution, config.image_resolution, device="meta")
    tokens = torch.zeros(num_classes, config.context_length, dtype=torch.long, device="meta")
    flops = []
    for fn, arg in ((model.encode_image, images), (model.encode_text, tokens)):
        with FlopCounterMode(display=False) as counter:
            fn(arg)
        flops.append(counter.get_total_flops())
    return round((flops[0] + flops[1]) / flops[0], 3)


def text_tower_step(trainer: PromptTrainer) -> Callable[[], None]:
    """One forward+backward through the class-text side (``encode_text``) of the trainer's model."""
    model = trainer.model
    model.train()

    def run() -> None:
        with trainer.autocast():
            out = model.encode_text()
        out.float().sum().backward()
        for p in model.parameters():
            p.grad = None

    return run


# ------------------------------------------------------------------------------ the benchmark


def _registered_trainers(selected: Sequence[str] | None) -> list[str]:
    from restore.engine.registry import TRAINER_REGISTRY

    load_plugins()

    names = list(TRAINER_REGISTRY.registered_names())
    prompt = [n for n in names if issubclass(TRAINER_REGISTRY.get(n), PromptTrainer)]
    if not selected:
        return prompt
    lower = {n.lower(): n for n in prompt}
    out = []
    for name in selected:
        if name.lower() not in lower:
            raise SystemExit(f"Unknown trainer {name!r}; registered prompt trainers: {sorted(prompt)}")
        out.append(lower[name.lower()])
    return out


def run_benchmark(device: torch.device, quick: bool = False, trainers: Sequence[str] | None = None,
                  tiny: bool = False, log: Callable[[str], None] = print, reps: int = 0,
                  class_counts: Sequence[int] | None = None, memory: bool = True,
                  on_progress: Callable[[dict[str, Any]], None] | None = None,
                  precision: str = "auto") -> dict[str, Any]:
    """Measure every selected trainer; returns the JSON report (see the module docstring).

    ``reps`` (> 0) overrides the preset's timed rounds, ``class_counts`` its (small, large) class
    counts, ``memory=False`` skips the CPU memory tracking (CUDA peaks are always measured).
    ``on_progress`` receives the partial report after every row (``main`` writes it to ``--json``,
    so a long run that is stopped keeps what it measured). ``precision``: ``auto`` (the trainers'
    default: PREC auto on CUDA, fp32 on CPU) or, on CPU, ``bf16`` (the GPU working precision
    emulated with CPU autocast: half the memory of fp32, which lets the plain path at 1000 classes
    fit in a laptop's RAM).
    """
    # The objects alive before the benchmark (imports, the caller's data) are none of its garbage: frozen,
    # they are skipped by the gc.collect() between measurements, which then takes milliseconds, not seconds.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        return _run_benchmark(device, quick, trainers, tiny, log, reps, class_counts, memory, on_progress, precision)
    finally:
        if freeze:
            gc.unfreeze()


def _run_benchmark(device: torch.device, quick: bool, trainers: Sequence[str] | None, tiny: bool,
                   log: Callable[[str], None], reps: int, class_counts: Sequence[int] | None, memory: bool,
                   on_progress: Callable[[dict[str, Any]], None] | None, precision: str) -> dict[str, Any]:
    """:func:`run_benchmark` itself."""
    preset = make_preset(quick, device, tiny)
    if reps > 0:
        preset.train_reps = preset.eval_reps = preset.text_reps = reps
        preset.train_warmup, preset.eval_warmup = min(preset.train_warmup, 1), min(preset.eval_warmup, 1)
        preset.notes.append(f"--reps {reps}: {reps} timed round(s) per measurement, at most 1 warm-up call")
    if class_counts:
        small, large = (min(class_counts), max(class_counts))
        preset.class_counts = (small, large)
        if large != 1000:
            preset.notes.append(f"--classes: *_1000 keys measured at {large} classes")
    if precision not in ("auto", "bf16"):
        raise ValueError(f"precision must be 'auto' or 'bf16', got {precision!r}")
    build_precision = "bf16" if precision == "bf16" else "auto"
    if device.type == "cuda":
        precision = resolve_precision(build_precision, device)
    else:
        precision = "bf16 (emulated on CPU: frozen CLIP in bf16, CPU autocast)" if precision == "bf16" else "fp32"
    names = _registered_trainers(trainers)
    reference = _reference_trainer(names)
    small, large = preset.class_counts
    log(f"RESTORE benchmark ({preset.name}) on {device}: trainers {names}; classes {small}/{large}; "
        f"train batch {preset.train_batch}, eval batch {preset.eval_batch}; precision {precision}")
    for note in preset.notes:
        log(f"  note: {note}")
    torch.manual_seed(0)
    clip_model = CLIP(preset.config).eval()
    res = preset.config.image_resolution
    notes = list(preset.notes)
    on_cpu = device.type != "cuda"
    track_cpu_memory = on_cpu and memory
    report: dict[str, Any] = {
        "preset": preset.name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "precision": precision,
        "clip_config": asdict(preset.config), "random_weights": True,
        "num_classes": list(preset.class_counts), "large_num_classes": large,
        "train_batch": preset.train_batch, "eval_batch": preset.eval_batch,
        "peak_memory_source": (f"torch.cuda.max_memory_allocated, {precision}" if not on_cpu else
                               "CPU, live tensors of one step in bf16 working precision (estimate of the GPU figure)"
                               if track_cpu_memory else None),
        "eval_cache_flop_ratio_1000": eval_cache_flop_ratio(preset.config, preset.eval_batch, large),
        "results": {},
    }
    results: dict[str, dict[str, Any]] = report["results"]
    step_ms: dict[str, float | None] = {}
    trainer: Any = None

    for name in names:
        results[name] = {}
        for num_classes in preset.class_counts:
            row: dict[str, Any] = {}
            classnames = synthetic_classnames(num_classes)
            train_batch = _batch(preset.train_batch, num_classes, res, device, seed=1)
            eval_batch = _batch(preset.eval_batch, num_classes, res, device, seed=2)
            t0 = time.perf_counter()
            trains = not _eval_only(name)
            try:
                trainer = build_bench_trainer(name, clip_model, classnames, device, build_precision)
                trains = trains and trainer.optim is not None
                if trains:
                    row.update(measure_train(trainer, train_batch, device, preset.train_warmup, preset.train_reps))
                headline = name == reference and num_classes == large
                row.update(measure_eval(trainer, eval_batch, device, preset.eval_warmup, preset.eval_reps,
                                        per_batch_text=headline))
                if headline:
                    # against the plain path (untruncated, per-batch text), as the issue defines it
                    report["eval_speedup_1000"] = row["eval_speedup"]
                    per_batch = row.pop("eval_images_per_s_per_batch_text")
                    report["eval_images_per_s_reference_per_batch_text"] = per_batch
                    report["eval_cache_only_speedup_1000"] = _ratio(row["eval_images_per_s"], per_batch)
                    text_step = text_tower_step(trainer)
                    paired = _paired({"fast": (contextlib.nullcontext, text_step),
                                      "plain": (lambda: speedups(truncate=False), text_step)},
                                     device, 1, preset.text_reps)
                    truncated, untruncated = paired["fast"][0], paired["plain"][0]
                    report["text_ms_1000"] = {"truncated": round(1000 * truncated, 2),
                                              "untruncated": round(1000 * untruncated, 2)}
                    report["text_speedup_1000"] = _ratio(untruncated, truncated)
                if trains and track_cpu_memory:  # last: it leaves the trainer in bf16
                    peaks = measure_memory_cpu(trainer, train_batch)
                    row["peak_memory_mib"], row["peak_memory_mib_plain"] = peaks["fast"], peaks["plain"]
                if num_classes == large:
                    step_ms[name] = row.get("train_ms_per_image")
            except Exception as err:  # noqa: BLE001 - one failing trainer must not stop the benchmark
                row["error"] = f"{type(err).__name__}: {err}"
                notes.append(f"{name} ({num_classes} classes) failed: {row['error']}")
            finally:
                trainer = None  # type: ignore[assignment]
                _free(device)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results[name][str(num_classes)] = row
            if on_progress is not None:
                on_progress(report)
            log(f"  {name:>14} {num_classes:>5} classes: " + ", ".join(
                f"{k} {v}" for k, v in row.items() if k != "seconds") + f"  [{row['seconds']} s]")

    # A method whose spec names a baseline (extras "benchmark_pair"): its step vs the baseline's, and its
    # variants' overhead, measured in alternation.
    for spec in list_methods():
        pair = spec.extras.get("benchmark_pair")
        if not pair or spec.trainer not in names:
            continue
        key, baseline = spec.key, str(pair["baseline"])
        variants = dict(pair.get("variants", {}))
        report[f"{key}_vs_{baseline.lower()}_step"] = None
        for variant in variants:
            report[f"{key}_{variant}_mode_overhead"] = None
        try:
            batch = _batch(preset.train_batch, large, res, device, 1)
            classnames = synthetic_classnames(large)
            runs = [(baseline.lower(), baseline, None), (key, spec.trainer, None)]
            runs += [(f"{key}_{v}", spec.trainer, overrides) for v, overrides in variants.items()]
            built = {k: build_bench_trainer(name, clip_model, classnames, device, build_precision, overrides)
                     for k, name, overrides in runs}
            compared = compare_train_steps(built, batch, device, preset.train_warmup, max(3, preset.train_reps))
            ms = {k: v[0] for k, v in compared.items()}
            report[f"{key}_step_ms_per_image"] = ms
            report[f"{key}_vs_{baseline.lower()}_step"] = _ratio(ms[key], ms[baseline.lower()])
            for variant in variants:
                report[f"{key}_{variant}_mode_overhead"] = _ratio(ms[f"{key}_{variant}"], ms[key])
        except Exception as err:  # noqa: BLE001
            notes.append(f"{spec.display}/{baseline} paired step failed: {type(err).__name__}: {err}")
        built = {}
        _free(device)

    # Frozen CLIP in the working precision vs all fp32: CUDA only.
    report["precision_speedup_train_1000"] = None
    if device.type == "cuda" and reference is not None and step_ms.get(reference) is not None:
        try:
            batch = _batch(preset.train_batch, large, res, device, 1)
            classnames = synthetic_classnames(large)
            built = {key: build_bench_trainer(reference, clip_model, classnames, device, prec)
                     for key, prec in (("fp32", "fp32"), (precision, build_precision))}
            compared = compare_train_steps(built, batch, device, preset.train_warmup, preset.train_reps)
            report["reference_train_ms_per_image_by_precision"] = {k: v[0] for k, v in compared.items()}
            report["reference_peak_memory_mib_by_precision"] = {k: v[1] for k, v in compared.items()}
            report["precision_speedup_train_1000"] = _ratio(compared["fp32"][0], compared[precision][0])
        except Exception as err:  # noqa: BLE001
            notes.append(f"{reference} fp32 failed: {type(err).__name__}: {err}")
        built = {}
        _free(device)
    else:
        notes.append("precision_speedup_train_1000 needs CUDA (fp32 vs the working precision on a GPU)")
    report.setdefault("text_speedup_1000", None)
    report.setdefault("eval_speedup_1000", None)
    if reference is None:
        notes.append("no reference method (extras benchmark_reference) selected: text_speedup_1000 and "
                     "eval_speedup_1000 are null")
    if track_cpu_memory:
        notes.append("peak MiB on CPU: every tensor alive in one training step (LiveTensorMemory) with frozen CLIP "
                     "in bf16 under bf16 autocast, the GPU path of PREC auto; an estimate of CUDA's "
                     "max_memory_allocated without the CUDA context, allocator slack or kernel workspaces")
    elif on_cpu:
        notes.append("peak memory: not tracked (--no-memory)")
    notes.append(f"eval_cache_flop_ratio_1000 = {report['eval_cache_flop_ratio_1000']}: by FLOP count, (image tower at batch "
                 f"{preset.eval_batch} + untruncated text tower over {large} classes) / image tower: what "
                 "caching the class text features saves in arithmetic (measured speed-ups differ as the towers run "
                 "at different FLOP rates)")
    report["notes"] = notes
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    large = report["large_num_classes"]
    cfg = report["clip_config"]
    lines = [
        f"# RESTORE benchmark ({report['preset']}, {report['device']}: {report['device_name']}, "
        f"torch {report['torch']}, {report['precision']})",
        "",
        f"CLIP with random weights: vision {cfg['vision_layers']}x{cfg['vision_width']} patch "
        f"{cfg['vision_patch_size']} @ {cfg['image_resolution']} px, text {cfg['transformer_layers']}x"
        f"{cfg['transformer_width']}, embed {cfg['embed_dim']}. Train batch {report['train_batch']}, eval batch "
        f"{report['eval_batch']}. 'emulation' = an EMULATION of the per-paper code (untruncated text tower and "
        f"per-batch text features), not the official code: {EMULATION_OFFSET} Peak memory: "
        f"{report.get('peak_memory_source') or 'not measured'}.",
        "",
        "| trainer | classes | train ms/img | emulation | speed-up vs emulation | peak MiB | emulation | eval img/s "
        "| emulation | speed-up vs emulation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in report["results"].items():
        for classes, row in rows.items():
            if "error" in row:
                lines.append(f"| {name} | {classes} | error: {row['error'][:80]} |  |  |  |  |  |  |  |")
                continue
            lines.append("| " + " | ".join([
                name, classes, _fmt(row.get("train_ms_per_image")), _fmt(row.get("train_ms_per_image_plain")),
                _fmt(row.get("train_speedup")), _fmt(row.get("peak_memory_mib")), _fmt(row.get("peak_memory_mib_plain")),
                _fmt(row.get("eval_images_per_s")), _fmt(row.get("eval_images_per_s_plain")),
                _fmt(row.get("eval_speedup"))]) + " |")
    lines += [
        "",
        f"| headline ({large} classes) | value |",
        "|---|---:|",
        f"| text_speedup_1000 (reference text tower fwd+bwd, untruncated / truncated) | {_fmt(report.get('text_speedup_1000'))} |",
        f"| eval_speedup_1000 (reference eval img/s, cached+truncated / emulation: per-batch untruncated text) | {_fmt(report.get('eval_speedup_1000'))} |",
        f"| eval_cache_flop_ratio_1000 (what caching saves, by FLOP count) | {_fmt(report.get('eval_cache_flop_ratio_1000'))} |",
        *[f"| {key} | {_fmt(value)} |" for key, value in report.items()
          if key.endswith(("_step", "_mode_overhead")) and not isinstance(value, dict)],
        f"| precision_speedup_train_1000 (reference fp32 / working-precision step) | {_fmt(report.get('precision_speedup_train_1000'))} |",
    ]
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m restore.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, about 3 minutes on 2 CPU cores: a narrower CLIP and 100 classes "
                        "(the *_1000 keys are then measured at 100)")
    parser.add_argument("--json", type=str, default="", help="write the report as JSON here")
    parser.add_argument("--md", type=str, default="", help="write the Markdown table here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--trainers", nargs="+", default=None, help="subset of registered trainers (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=0, help="timed rounds per measurement (default: the preset's)")
    parser.add_argument("--classes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="class counts (default 47 1000; --quick 47 100)")
    parser.add_argument("--no-memory", action="store_true", help="on CPU, skip tracking peak memory")
    parser.add_argument("--precision", choices=("auto", "bf16"), default="auto",
                        help="auto: the trainers' default (PREC auto on CUDA, fp32 on CPU); bf16: PREC bf16 on CUDA, "
                             "the GPU path emulated on CPU (half the memory of fp32)")
    parser.add_argument("--official", metavar="DIR", default="",
                        help="a local checkout of a method's official code: build both models on the same random "
                             "ViT-B/16 weights, check they agree, time them side by side (default classes 47 100); "
                             "without it the baseline is an emulation of the official code (see docs/benchmark.md)")
    parser.add_argument("--official-precision", choices=("fp32", "fp16", "amp"), default=None,
                        help="PREC of both sides with --official (default fp32 on CPU, fp16 on CUDA: the official)")
    parser.add_argument("--mha", action="store_true",
                        help="with --official: also time ours with nn.MultiheadAttention (the attention before the "
                             "fused one) at the first class count, in the same rounds")
    parser.add_argument("--eval-reps", type=int, default=0, help="with --official: evaluation rounds (default --reps)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds, tiny CLIP
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif args.tiny:
        torch.set_num_threads(1)
    elif device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        # Oversubscribed intra-op threads spin-wait and slow down by orders of magnitude on a busy machine.
        print(f"note: the machine is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): using 1 CPU "
              "thread (pass --threads N to override)")
        torch.set_num_threads(1)
    start = time.time()
    if args.official:
        return _main_official(args, device, start)

    report = run_benchmark(device, quick=args.quick, trainers=args.trainers, tiny=args.tiny, reps=args.reps,
                           class_counts=args.classes, memory=not args.no_memory, on_progress=_partial_saver(args),
                           precision=args.precision)
    report["wall_s"] = round(time.time() - start, 1)
    _write_report(report, markdown(report), args)
    return 0


def _partial_saver(args: argparse.Namespace) -> Callable[[dict[str, Any]], None]:
    """Writes the report so far (marked partial) after every row, so a long run is never lost."""

    def save_partial(partial: dict[str, Any]) -> None:
        if args.json:
            atomic_write_json({**partial, "partial": True}, os.path.abspath(args.json))

    return save_partial


def _write_report(report: dict[str, Any], table: str, args: argparse.Namespace) -> None:
    """Print the Markdown table and write the ``--json`` / ``--md`` files asked for."""
    print()
    print(table)
    if args.json:
        atomic_write_json(report, os.path.abspath(args.json))
        print(f"JSON written to {args.json}")
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(table)
        print(f"Markdown written to {args.md}")


def _main_official(args: argparse.Namespace, device: torch.device, start: float) -> int:
    from restore.benchmark_official import environment_line, official_markdown, run_official_benchmark

    precision = args.official_precision or ("fp16" if device.type == "cuda" else "fp32")
    try:
        report = run_official_benchmark(args.official, device, trainers=args.trainers, class_counts=args.classes,
                                        precision=precision, reps=args.reps, tiny=args.tiny, mha=args.mha,
                                        eval_reps=args.eval_reps, on_progress=_partial_saver(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["machine"] = environment_line()
    report["wall_s"] = round(time.time() - start, 1)
    _write_report(report, official_markdown(report), args)
    refused = [f"{n} {c}" for n, rows in report["results"].items() for c, r in rows.items() if "refused" in r]
    return 3 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
