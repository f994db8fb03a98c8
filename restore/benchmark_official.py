"""Speed and memory against a method's official code, side by side in one process.

    python -m restore.benchmark --official DIR [--trainers CoOp MaPLe] [--classes 47 100] [--device cuda]

``DIR`` is a local checkout of the official repository (its code is imported at run time, never
copied here). For every registered trainer whose ``OFFICIAL`` declaration (an
:class:`~restore.official.OfficialRun` beside the trainer) names a trainer class that ``DIR``
defines, the benchmark

1. writes a CLIP of ViT-B/16 shape with random weights in OpenAI's format (the official MaPLe /
   RESTORE code hard-codes widths 512/768) and builds both models on that file: the official one
   through its own ``build_model`` (with :func:`restore.official.official_shims`: CLIP download ->
   the file, ``.half()`` a no-op in fp32), ours through our trainer's ``build_model``;
2. copies the official model's learnable tensors into ours (the method's ``official_keys``, the
   same renaming that reads official checkpoints), so both hold the same values;
3. checks agreement (:func:`check_agreement`): the logits of one evaluation batch, the loss of one
   training step and the gradients of the learned tensors in that step must agree
   within :data:`TOLERANCE` (relative); if they do not, no ratio is reported
   (:class:`DisagreementError`);
4. times training steps (``forward_backward``: forward, backward, optimiser step) and evaluation
   (``model_inference`` in eval mode; ours inside its ``inference_context``) of both, alternating
   official / ours in every round (medians, with min and max), and the peak memory of one step.

Peak memory: CUDA ``max_memory_allocated``; on CPU the live tensors of one step
(:class:`~restore.benchmark.LiveTensorMemory`, fp32).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import importlib
import importlib.util
import math
import os
import os.path as osp
import re
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from restore import benchmark as bench
from restore.prompting.official import rename_official_state

__all__ = ["TOLERANCE", "DisagreementError", "Agreement", "official_trainer_class", "official_cfg",
           "build_official", "copy_learnable", "check_agreement", "compare_with_official", "official_markdown"]

#: Relative tolerance of the agreement check per precision: ||ours - official|| / ||official|| per tensor.
TOLERANCE = {"fp32": 5e-3, "fp16": 2e-2, "amp": 2e-2}


class DisagreementError(RuntimeError):
    """The two models do not compute the same thing: no speed ratio may be reported."""


@dataclass
class Agreement:
    """What :func:`check_agreement` measured (relative differences, see :data:`TOLERANCE`)."""

    loss_official: float
    loss_ours: float
    loss_rel_diff: float
    logits_rel_diff: float
    grads_rel_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.loss_rel_diff, self.logits_rel_diff, self.grads_rel_diff) <= self.tolerance


# ------------------------------------------------------------------------------ the official model


def _official_package(checkout: str) -> str:
    return "_official_" + re.sub(r"\W", "_", osp.basename(osp.abspath(checkout).rstrip("/"))) + "_trainers"


def official_trainer_class(checkout: str, name: str) -> type | None:
    """The trainer class ``name`` defined in ``checkout/trainers/*.py`` (None if no file defines it).

    The checkout's ``trainers`` package is imported under a private name (this repository has its
    own ``trainers``), and its registrations go to a scratch registry (the official classes reuse
    our trainers' names)."""
    from restore.engine.registry import TRAINER_REGISTRY

    pattern = re.compile(rf"^class {re.escape(name)}\(", re.MULTILINE)

    def defines(path: str) -> bool:
        with open(path, encoding="utf-8", errors="replace") as f:
            return pattern.search(f.read()) is not None

    found = [path for path in sorted(glob.glob(osp.join(checkout, "trainers", "*.py"))) if defines(path)]
    if not found:
        return None
    package = _official_package(checkout)
    if package not in sys.modules:
        init = osp.join(checkout, "trainers", "__init__.py")
        spec = importlib.util.spec_from_file_location(package, init if osp.isfile(init) else None,
                                                      submodule_search_locations=[osp.join(checkout, "trainers")])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {checkout}/trainers")
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    saved = dict(TRAINER_REGISTRY._obj_map)
    TRAINER_REGISTRY._obj_map.clear()
    try:
        module = importlib.import_module(f"{package}.{osp.splitext(osp.basename(found[0]))[0]}")
    finally:
        TRAINER_REGISTRY._obj_map.clear()
        TRAINER_REGISTRY._obj_map.update(saved)
    cls = getattr(module, name, None)
    return cls if isinstance(cls, type) else None


def official_cfg(checkout: str, trainer: str, config: str, precision: str) -> Any:
    """The official config: our defaults (Dassl's), the checkout's own ``extend_cfg`` (read from its
    ``train.py`` without running the rest of it), its ``config`` file, and ``PREC = precision`` in
    every trainer node (MaPLe_FSA reads MaPLe's)."""
    from restore.engine.config import CN as CfgNode
    from restore.engine.config import get_cfg_default

    with open(osp.join(checkout, "train.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    functions: list[ast.stmt] = [node for node in tree.body
                                 if isinstance(node, ast.FunctionDef) and node.name == "extend_cfg"]
    if not functions:
        raise ValueError(f"{checkout}/train.py defines no extend_cfg: is it a Dassl-based checkout?")
    namespace: dict[str, Any] = {"CN": CfgNode}
    # the official code's own config function, from the checkout the user pointed at (its trainers run too)
    exec(compile(ast.Module(body=functions, type_ignores=[]), osp.join(checkout, "train.py"), "exec"), namespace)  # noqa: S102
    cfg = get_cfg_default()
    namespace["extend_cfg"](cfg)
    cfg.set_new_allowed(True)
    cfg.merge_from_file(osp.join(checkout, config))
    cfg.TRAINER.NAME = trainer
    for node in cfg.TRAINER.values():
        if isinstance(node, CfgNode) and "PREC" in node:
            node.PREC = precision
    return cfg


def build_official(checkout: str, trainer: str, config: str, classnames: Sequence[str], weights: str,
                   device: torch.device, precision: str = "fp32") -> Any:
    """The official trainer ``trainer`` of ``checkout`` after its own ``build_model`` on ``weights``;
    to be called inside :func:`official_session` (the shims the official code needs)."""
    cls = official_trainer_class(checkout, trainer)
    if cls is None:
        raise ValueError(f"{checkout} defines no trainer {trainer!r} in trainers/*.py.")
    cfg = official_cfg(checkout, trainer, config, precision)
    cfg.USE_CUDA = device.type == "cuda"
    cfg.DATASET.NAME = "ImageNet"  # as for ours (the text template of MMRL, per dataset)
    resolution = _weights_resolution(weights)
    cfg.INPUT.SIZE = (resolution, resolution)
    built = bench.bare_trainer(cls, cfg, classnames, device)
    with bench._quiet():
        built.build_model()
    return built


@contextlib.contextmanager
def official_session(checkout: str, weights: str, precision: str) -> Iterator[None]:
    """:func:`restore.official.official_shims` for ``checkout`` (CLIP download -> ``weights``, ``.half()``
    a no-op in fp32, ``.cuda()`` a no-op without a GPU) while the official models are used; on exit the
    checkout's modules (its ``clip`` package and trainers) are removed from ``sys.modules`` again."""
    from restore.official import official_shims

    own = _official_package(checkout)
    before = {k: v for k, v in sys.modules.items() if k == "clip" or k.startswith(("clip.", own))}
    try:
        with official_shims(checkout, weights, fp32=precision == "fp32"):
            yield
    finally:
        for key in [k for k in sys.modules if k == "clip" or k.startswith(("clip.", own))]:
            del sys.modules[key]
        sys.modules.update(before)


def _weights_resolution(weights: str) -> int:
    from restore.clip.loader import load_clip

    with bench._quiet():
        return int(load_clip(weights, device="cpu").input_resolution)


def _learnable_state(trainer: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for module in trainer._models.values():
        for key, value in module.state_dict(keep_vars=True).items():
            state.setdefault(key, value.detach())
    return state


def copy_learnable(official: Any, ours: Any) -> int:
    """Copy the official model's learned tensors into ours (the renaming of the method's
    ``official_keys``); returns how many. Missing, unexpected or mis-shaped tensors are errors."""
    model = ours.model
    state = {k: v.clone() for k, v in _learnable_state(official).items()}
    with bench._quiet():
        model.load_checkpoint_state(state, "the official model")
    return len(model.checkpoint_state())


# ------------------------------------------------------------------------------ agreement


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _outputs(trainer: Any, images: torch.Tensor, ours: bool) -> list[torch.Tensor]:
    """The evaluation output(s): a model returning a tuple (MMRL: class, representation and fused
    logits) gives every tensor in it."""
    trainer.set_model_mode("eval")
    with torch.no_grad(), bench._quiet(), (trainer.inference_context() if ours else contextlib.nullcontext()):
        out = trainer.model_inference(images)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.float() for o in outs if isinstance(o, torch.Tensor)]


def _step(trainer: Any, batch: dict[str, torch.Tensor]) -> float:
    trainer.set_model_mode("train")
    with bench._quiet():
        summary = trainer.forward_backward(batch)
    trainer.batch_idx = 0
    return float(summary["loss"])


def _grads(named: Any) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in named if p.requires_grad and p.grad is not None}


def check_agreement(official: Any, ours: Any, batch: dict[str, torch.Tensor], images: torch.Tensor,
                    precision: str = "fp32") -> Agreement:
    """Logits on ``images``, the loss of one training step on ``batch`` and the gradients of the
    learned tensors in that step, official vs ours (both must hold the same values before, see
    :func:`copy_learnable`; a learned tensor without a counterpart counts as a disagreement)."""
    mine_logits = _outputs(ours, images, True)[0]
    # the official output our logits are (MMRL returns several; the closest one is reported)
    logits = min((_rel(mine_logits, o) for o in _outputs(official, images, False)), default=math.inf)
    loss_official, loss_ours = _step(official, batch), _step(ours, batch)
    loss = abs(loss_ours - loss_official) / max(abs(loss_official), 1e-12)
    official_grads: dict[str, torch.Tensor] = {}
    for module in official._models.values():
        for key, value in _grads(module.named_parameters()).items():
            official_grads.setdefault(key, value)
    expected = rename_official_state(official_grads, ours.model.official_keys)
    mine = _grads(ours.model.named_parameters())
    grads = max((_rel(mine[k], v) if k in mine else math.inf for k, v in expected.items()), default=math.inf)
    if set(mine) - set(expected):
        grads = math.inf
    return Agreement(loss_official, loss_ours, loss, logits, grads, TOLERANCE.get(precision, 5e-3))


# ------------------------------------------------------------------------------ timing


def _spread(samples: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _peak_step_mib(trainer: Any, batch: dict[str, torch.Tensor], device: torch.device) -> float | None:
    """Peak memory of one training step: CUDA's allocator peak, or on CPU the live tensors (fp32)."""
    trainer.set_model_mode("train")
    if device.type == "cuda":
        bench._free(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(trainer, batch)
        torch.cuda.synchronize(device)
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    existing = [t for m in trainer._models.values() for t in [*m.parameters(), *m.buffers()]]
    for optim in trainer._optims.values():
        if optim is not None:
            existing += [v for s in optim.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tracker = bench.LiveTensorMemory(existing)
    with tracker:
        _step(trainer, batch)
    return round(tracker.peak / 2**20, 1)


def time_pair(official: Any, ours: Any, batch: dict[str, torch.Tensor], images: torch.Tensor,
              device: torch.device, warmup: int, rounds: int, eval_rounds: int | None = None,
              with_mha: bool = False) -> dict[str, Any]:
    """Training step (ms per image) and evaluation (images/s) of both, official and ours alternating.
    ``with_mha`` adds ours with ``nn.MultiheadAttention`` (:func:`restore.benchmark.mha_attention`,
    the attention before the fused one) as a third mode of the same rounds (``ours_mha``)."""
    samples: dict[str, list[float]] = {}

    def train_mode(trainer: Any, mha: bool = False) -> Callable[[], contextlib.AbstractContextManager]:
        def enter() -> contextlib.AbstractContextManager:
            trainer.set_model_mode("train")
            return bench.mha_attention() if mha else contextlib.nullcontext()
        return enter

    modes = {"official": (train_mode(official), lambda: _step(official, batch)),
             "ours": (train_mode(ours), lambda: _step(ours, batch))}
    if with_mha:
        modes["ours_mha"] = (train_mode(ours, True), lambda: _step(ours, batch))
    bench._paired(modes, device, warmup, rounds, samples)
    train = {k: _spread([1000 * s / batch["img"].shape[0] for s in v]) for k, v in samples.items()}

    def eval_context(trainer: Any, cached: bool, mha: bool = False) -> Callable[[], contextlib.ExitStack]:
        def enter() -> contextlib.ExitStack:
            trainer.set_model_mode("eval")
            stack = contextlib.ExitStack()
            stack.enter_context(bench._quiet())
            stack.enter_context(torch.no_grad())
            if mha:
                stack.enter_context(bench.mha_attention())
            if cached:
                stack.enter_context(trainer.inference_context())
            return stack
        return enter

    samples = {}
    modes = {"official": (eval_context(official, False), lambda: official.model_inference(images)),
             "ours": (eval_context(ours, True), lambda: ours.model_inference(images))}
    if with_mha:
        modes["ours_mha"] = (eval_context(ours, True, True), lambda: ours.model_inference(images))
    bench._paired(modes, device, 0, eval_rounds or rounds, samples)
    evaluation = {k: _spread([images.shape[0] / s for s in v]) for k, v in samples.items()}
    row: dict[str, Any] = {
        "train_ms_per_image": train, "eval_images_per_s": evaluation,
        "train_speedup": bench._ratio(train["official"]["median"], train["ours"]["median"]),
        "eval_speedup": bench._ratio(evaluation["ours"]["median"], evaluation["official"]["median"])}
    if with_mha:
        row["mha"] = {"train_speedup": bench._ratio(train["official"]["median"], train["ours_mha"]["median"]),
                      "eval_speedup": bench._ratio(evaluation["ours_mha"]["median"], evaluation["official"]["median"]),
                      "fused_vs_mha_train": bench._ratio(train["ours_mha"]["median"], train["ours"]["median"]),
                      "fused_vs_mha_eval": bench._ratio(evaluation["ours"]["median"], evaluation["ours_mha"]["median"])}
    return row


# ------------------------------------------------------------------------------ the benchmark


def official_run_of(name: str) -> Any:
    """The ``OFFICIAL`` declaration beside the registered trainer ``name`` (None if it has none)."""
    from restore.engine.registry import TRAINER_REGISTRY
    from restore.official import OfficialRun

    cls = TRAINER_REGISTRY.get(name)
    run = getattr(sys.modules.get(cls.__module__), "OFFICIAL", None)
    return run if isinstance(run, OfficialRun) else None


def compare_with_official(checkout: str, name: str, classnames: Sequence[str], weights: str, device: torch.device,
                          precision: str, preset: bench.Preset, resolution: int,
                          build: Callable[..., Any] | None = None, with_mha: bool = False,
                          eval_rounds: int | None = None) -> dict[str, Any]:
    """One row: build both models, copy the parameters, check agreement, time them (see the module
    docstring). Raises :class:`DisagreementError` when they disagree."""
    from restore.clip.loader import load_clip

    run = official_run_of(name)
    if run is None:
        raise ValueError(f"trainer {name} declares no OFFICIAL run: nothing to compare with.")
    official = (build or build_official)(checkout, run.trainer, run.config, classnames, weights, device, precision)
    with bench._quiet():
        clip_model = load_clip(weights, device="cpu").model
    ours = bench.build_bench_trainer(name, clip_model, classnames, device, precision)
    copied = copy_learnable(official, ours)
    num = len(classnames)
    batch = bench._batch(preset.train_batch, num, resolution, device, seed=1)
    images = bench._batch(preset.eval_batch, num, resolution, device, seed=2)["img"]
    agreement = check_agreement(official, ours, batch, images[:8], precision)
    row: dict[str, Any] = {"official_trainer": run.trainer, "official_config": run.config,
                           "learned_tensors_copied": copied, "agreement": vars(agreement) | {"ok": agreement.ok}}
    if not agreement.ok:
        raise DisagreementError(
            f"{name} and the official {run.trainer} disagree on the same batch and parameters (loss "
            f"{agreement.loss_ours:.6g} vs {agreement.loss_official:.6g}, relative differences: loss "
            f"{agreement.loss_rel_diff:.2e}, logits {agreement.logits_rel_diff:.2e}, gradients of the learned tensors "
            f"{agreement.grads_rel_diff:.2e}; tolerance {agreement.tolerance:.0e}): no speed ratio is reported.")
    row.update(time_pair(official, ours, batch, images, device, preset.train_warmup, preset.train_reps,
                         eval_rounds, with_mha))
    row["peak_memory_mib"] = {"official": _peak_step_mib(official, batch, device),
                              "ours": _peak_step_mib(ours, batch, device)}
    row["memory_ratio"] = bench._ratio(row["peak_memory_mib"]["official"], row["peak_memory_mib"]["ours"])
    return row


def run_official_benchmark(checkout: str, device: torch.device, trainers: Sequence[str] | None = None,
                           class_counts: Sequence[int] | None = None, precision: str = "fp32", reps: int = 0,
                           tiny: bool = False, log: Callable[[str], None] = print,
                           build: Callable[..., Any] | None = None, mha: bool = False,
                           eval_reps: int = 0, on_progress: Callable[[dict[str, Any]], None] | None = None
                           ) -> dict[str, Any]:
    """The report (JSON-ready) of :func:`compare_with_official` for every selected trainer and class count;
    ``mha``: also ours with ``nn.MultiheadAttention`` at the first class count (see :func:`time_pair`)."""
    from restore.engine.registry import TRAINER_REGISTRY
    from restore.methods import load_plugins
    from restore.official import official_root, write_parity_clip

    load_plugins()  # registers the methods (this checkout's trainers and installed plugins)
    try:
        checkout = official_root(checkout)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--official {err}") from None
    preset = bench.make_preset(False, device, tiny=tiny)
    config = preset.config if tiny else bench.VIT_B16_CONFIG
    if reps:
        preset.train_reps = reps
    preset.train_warmup = min(preset.train_warmup, 1)
    preset.eval_reps = eval_reps or preset.train_reps
    counts = list(dict.fromkeys(class_counts or ((5, 12) if tiny else (47, 100))))
    report: dict[str, Any] = {
        "mode": "official", "checkout": checkout, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else bench._cpu_name(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "precision": precision,
        "clip_config": asdict(config),
        "random_weights": True, "train_batch": preset.train_batch, "eval_batch": preset.eval_batch,
        "rounds": preset.train_reps, "eval_rounds": preset.eval_reps, "tolerance": TOLERANCE.get(precision, 5e-3), "results": {}, "notes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_parity_clip(osp.join(tmp, "clip.pt"), seed=0, config=config)
        with official_session(checkout, weights, precision):
            names = list(trainers) if trainers else [
                n for n in TRAINER_REGISTRY.registered_names()
                if (run := official_run_of(n)) is not None and official_trainer_class(checkout, run.trainer) is not None]
            if not names:
                raise ValueError(f"no registered trainer declares an OFFICIAL run whose trainer {checkout}/trainers "
                                 "defines: pass --trainers NAME.")
            _run_rows(report, checkout, names, counts, weights, device, precision, preset, config, build, log, mha,
                      on_progress)
    return report


def _run_rows(report: dict[str, Any], checkout: str, names: Sequence[str], counts: Sequence[int], weights: str,
              device: torch.device, precision: str, preset: bench.Preset, config: Any,
              build: Callable[..., Any] | None, log: Callable[[str], None], mha: bool = False,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
    for name in names:
        report["results"][name] = {}
        for num in counts:
            try:
                row = compare_with_official(checkout, name, bench.synthetic_classnames(num), weights, device,
                                            precision, preset, config.image_resolution, build=build,
                                            with_mha=mha and num == counts[0], eval_rounds=preset.eval_reps)
            except DisagreementError as err:
                row = {"refused": str(err)}
            except Exception as err:  # noqa: BLE001 - one failing method must not stop the others
                row = {"error": f"{type(err).__name__}: {err}"}
            bench._free(device)
            report["results"][name][str(num)] = row
            log(f"  {name:>10} {num:>5} classes: " + _row_line(row))
            if on_progress is not None:
                on_progress(report)


def _row_line(row: dict[str, Any]) -> str:
    if "refused" in row or "error" in row:
        return row.get("refused") or row["error"]
    mha = (f"; with nn.MultiheadAttention: train {row['mha']['train_speedup']}x, eval {row['mha']['eval_speedup']}x"
           if "mha" in row else "")
    return (f"train {row['train_speedup']}x, eval {row['eval_speedup']}x, memory {row['memory_ratio']}x "
            f"(loss {row['agreement']['loss_rel_diff']:.1e}, logits {row['agreement']['logits_rel_diff']:.1e}){mha}")


def _cell(text: str, limit: int = 400) -> str:
    """``text`` as one Markdown table cell: pipes escaped, cut at a word boundary past ``limit`` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def official_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (official vs ours per trainer and class count)."""
    f = bench._fmt
    cfg = report["clip_config"]
    lines = [
        f"# Speed against the official code ({report['device']}: {report['device_name']}, {report['cpu_threads']} "
        f"threads, torch {report['torch']}, {report['precision']})",
        "",
        f"Official checkout: `{report['checkout']}`. CLIP with random weights: vision {cfg['vision_layers']}x"
        f"{cfg['vision_width']} patch {cfg['vision_patch_size']} @ {cfg['image_resolution']} px, text "
        f"{cfg['transformer_layers']}x{cfg['transformer_width']}. Train batch {report['train_batch']} "
        f"(forward, backward, optimiser step), eval batch {report['eval_batch']}; {report['rounds']} rounds "
        f"(evaluation {report.get('eval_rounds')}) alternating official / ours, median [min-max]. Agreement: "
        f"relative difference (norm) of the loss, the logits and the gradients of the learned tensors, tolerance {report['tolerance']:.0e}.",
        "",
        "| trainer (official) | classes | loss / logits / grads rel. diff | train ms/img official | ours | speed-up "
        "| eval img/s official | ours | speed-up | peak MiB official | ours | ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def spread(d: dict[str, float]) -> str:
        return f"{f(d['median'])} [{f(d['min'])}-{f(d['max'])}]"

    for name, rows in report["results"].items():
        for classes, row in rows.items():
            if "refused" in row or "error" in row:
                lines.append(f"| {name} | {classes} | {'REFUSED' if 'refused' in row else 'error'}: "
                             f"{_cell(row.get('refused') or row['error'])} |" + " |" * 9)
                continue
            a = row["agreement"]
            lines.append("| " + " | ".join([
                f"{name} ({row['official_trainer']})", classes,
                f"{a['loss_rel_diff']:.1e} / {a['logits_rel_diff']:.1e} / {a['grads_rel_diff']:.1e}",
                spread(row["train_ms_per_image"]["official"]), spread(row["train_ms_per_image"]["ours"]),
                f"**{f(row['train_speedup'])}x**", spread(row["eval_images_per_s"]["official"]),
                spread(row["eval_images_per_s"]["ours"]), f"**{f(row['eval_speedup'])}x**",
                f(row["peak_memory_mib"]["official"]), f(row["peak_memory_mib"]["ours"]),
                f"{f(row['memory_ratio'])}x"]) + " |")
    mha_rows = [(n, c, r) for n, rows in report["results"].items() for c, r in rows.items() if "mha" in r]
    if mha_rows:
        lines += ["", "Attention before (nn.MultiheadAttention) and after (fused) in the same rounds:", "",
                  "| trainer | classes | train speed-up vs official, MHA -> fused | eval speed-up, MHA -> fused "
                  "| fused / MHA train | fused / MHA eval |", "|---|---:|---:|---:|---:|---:|"]
        for name, classes, row in mha_rows:
            m = row["mha"]
            lines.append(f"| {name} | {classes} | {f(m['train_speedup'])}x -> {f(row['train_speedup'])}x | "
                         f"{f(m['eval_speedup'])}x -> {f(row['eval_speedup'])}x | {f(m['fused_vs_mha_train'])}x | "
                         f"{f(m['fused_vs_mha_eval'])}x |")
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def environment_line() -> str:
    """``os.cpu_count`` and load average, for the report (a shared machine skews timings)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
