"""Feature shift as the RESTORE paper defines it, measured block by block; and a CLI to compare runs.

The paper (§3.3, Eq. 6) defines the feature shift of block ``i`` as the difference between the
block's output **with** and **without** the learnable prompts, for the **same input**::

    dF_i = Block_i(X_{i-1}, P_i) - Block_i(X_{i-1})

It leaves open which tokens are compared, how a batch is reduced and how the two towers, whose
activations differ in size and scale, are made comparable. The choices made here (one
implementation, used by the RESTORE trainer's ``SHIFT "feature"`` mode and by the analysis CLI):

* **Same input.** ``X_{i-1}`` is the block input of the prompted forward (it already carries the
  influence of earlier prompts). The prompt-free pass runs the same frozen block on that input with
  the prompt *positions removed* (not replaced by anything). For the text tower the causal mask
  is rebuilt for the shorter sequence. The prompt-free pass runs under ``no_grad``: gradients
  flow through the prompted output only, and it costs no activation memory.
* **Tokens compared.** Vision: every non-prompt token (CLS + patches). Text: the non-prompt
  positions up to and including EOT (SOS, the fixed words, the class name, ".", EOT); padding after
  EOT is excluded per class. The layer-0 learned text context (CoOp, MaPLe, IVLP...) counts as
  prompt positions: the prompt-free text at layer 0 is "[SOS] of a <class>. [EOT]" for
  "a photo of a" with 2 learned tokens (the alternative, putting the hand-written word embeddings
  back into those slots, is not used).
* **Scale-free relative shift.** Per sample (image, or class prompt) ``b``::

      s_i(b) = ||dF_i(b)||_F / (||Block_i(X_{i-1}(b))||_F + eps)

  and the layer's shift is the mean over samples. It does not grow with batch size, class count,
  token count or width, so the text and vision values are comparable (restore.md §5(b)).

Blocks whose input holds no prompt token have shift 0 by definition (the block sees exactly what
frozen CLIP sees) and are not re-run.

Use from code::

    with observe_shift(model) as rec:          # any PromptModel using model.text_encoder/image_encoder
        text = model.encode_text(); image = model.encode_image(images)
    rec.text.layer_means()                     # {layer: differentiable scalar}

Analysis CLI (reads each run's ``log.txt`` config, rebuilds the trainer, loads its checkpoint)::

    python -m restore.analysis.feature_shift RUN_DIR [RUN_DIR ...] [--root DATA] [--split new]
        [--max-images 64] [--labels IVLP MaPLe RESTORE] [--out DIR]

writes ``feature_shift.csv`` (run, layer, text and vision shift, inter-modal discrepancy
``|s_t - s_v|``) and ``feature_shift.png`` (one line per run, as in the paper's Fig. 3-4).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import os.path as osp
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from restore.clip.model import causal_mask
from restore.engine.utils import error_message
from restore.prompting.encoders import PromptedTextEncoder

__all__ = [
    "ShiftRecorder", "ShiftRecording", "relative_block_shift", "observe_shift", "text_context_positions",
    "measure_model_shift", "ShiftProfile", "load_run", "analyse_runs", "write_csv", "plot_profiles", "main",
]

BlockFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def relative_block_shift(block: BlockFn, x_in: torch.Tensor, x_out: torch.Tensor, prompt_mask: torch.Tensor,
                         causal: bool, eot_index: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample relative shift ``||dF(b)||_F / (||F_without(b)||_F + eps)`` of one block, shape (B,).

    Args:
        block: the frozen block, called as ``block(x, attn_mask)``.
        x_in: the block's input in the prompted forward, (B, L, D).
        x_out: the block's output in the prompted forward, (B, L, D) (may carry gradients).
        prompt_mask: (L,) bool, True at prompt positions (removed for the prompt-free pass).
        causal: rebuild a causal mask for the shortened sequence (text tower).
        eot_index: (B,) position of EOT in the *prompted* sequence; later positions are ignored.
        eps: added to the denominator.
    """
    keep = ~prompt_mask.to(x_in.device)
    x_without = x_in[:, keep]
    with torch.no_grad():
        length = x_without.shape[1]
        mask = causal_mask(length, x_in.device, x_in.dtype) if causal else None
        f_without = block(x_without.detach(), mask).float()
    f_with = x_out[:, keep].float()
    diff = f_with - f_without
    if eot_index is not None:
        # EOT's index among the kept tokens; padding after it is dropped.
        kept_before = torch.cumsum(keep.long(), dim=0) - 1
        eot_kept = kept_before[eot_index.to(x_in.device)]
        valid = torch.arange(length, device=x_in.device)[None, :] <= eot_kept[:, None]
        diff = diff * valid[..., None]
        f_without = f_without * valid[..., None]
    num = torch.linalg.vector_norm(diff, dim=(1, 2))
    den = torch.linalg.vector_norm(f_without, dim=(1, 2))
    return num / (den + eps)


class ShiftRecorder:
    """An encoder ``observer`` that records per-sample relative shifts of selected blocks.

    Args:
        tower: "text" (causal mask, EOT handling) or "vision".
        layers: block indices to measure (``None``: every block whose input holds prompt tokens).
        extra_positions: prompt positions not reported by the encoder's deep-token slots, in the
            coordinates of the text embeddings (the layer-0 learned context, positions ``1..n``).
            Used while no token has been inserted into the sequence.
        eps: denominator epsilon.
    """

    def __init__(self, tower: str, layers: Iterable[int] | None = None, extra_positions: Sequence[int] = (),
                 eps: float = 1e-6) -> None:
        if tower not in ("text", "vision"):
            raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
        self.tower = tower
        self.layers = None if layers is None else set(int(k) for k in layers)
        self.extra_positions = list(extra_positions)
        self.eps = eps
        self.shifts: dict[int, torch.Tensor] = {}
        self.done = False
        self._eot: torch.Tensor | None = None
        self._length0 = 0

    def start(self, length0: int, eot_index: torch.Tensor | None = None) -> None:
        """Called by :func:`observe_shift` before the observed encoder call."""
        self._length0 = length0
        self._eot = eot_index

    def __call__(self, layer: int, block: nn.Module, x_in: torch.Tensor, x_out: torch.Tensor,
                 prompt_mask: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
        if self.done or (self.layers is not None and layer not in self.layers):
            return
        length = x_in.shape[1]
        mask = prompt_mask.clone()
        if self.extra_positions and length == self._length0:
            idx = torch.tensor([p for p in self.extra_positions if p < length], dtype=torch.long, device=mask.device)
            mask[idx] = True
        if not bool(mask.any()):
            return  # nothing prompted enters this block: shift 0 by definition
        eot = None
        if self.tower == "text" and self._eot is not None:
            eot = (self._eot.to(x_in.device) + (length - self._length0)).clamp(max=length - 1)
        self.shifts[layer] = relative_block_shift(
            block, x_in, x_out, mask,
            causal=self.tower == "text", eot_index=eot, eps=self.eps)

    def layer_means(self) -> dict[int, torch.Tensor]:
        """Mean over samples per measured layer (0-dim tensors, differentiable)."""
        return {k: v.mean() for k, v in sorted(self.shifts.items())}

    def vector(self, layers: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """Layer means in the order of ``layers`` (0 for a layer without prompt tokens), fp32."""
        means = self.layer_means()
        zero = torch.zeros((), device=device)
        values = [means[k].float() if k in means else zero for k in layers]
        return torch.stack(values) if values else torch.zeros(0, device=device)


@dataclass
class ShiftRecording:
    text: ShiftRecorder
    vision: ShiftRecorder


class _ObservedEncoder:
    """Stands in for a PromptModel's encoder: adds the observer to prompted calls, delegates the rest.

    A call is observed only when it carries deep tokens (or, for text, learned layer-0 context
    positions are known), and only the first such call: fixed-prompt and teacher passes made through
    ``encode_token_ids`` or without prompts are left alone.
    """

    def __init__(self, encoder: nn.Module, recorder: ShiftRecorder) -> None:
        self._encoder = encoder
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rec = self._recorder
        if isinstance(self._encoder, PromptedTextEncoder):
            embeddings = args[0] if args else kwargs["embeddings"]
            eot = args[1] if len(args) > 1 else kwargs["eot_index"]
            deep = args[2] if len(args) > 2 else kwargs.get("deep", ())
            observe = not rec.done and "observer" not in kwargs and (len(deep) > 0 or bool(rec.extra_positions))
            if observe:
                truncate = kwargs.get("truncate", True)
                length0 = int(eot.max()) + 1 if truncate else embeddings.shape[1]
                rec.start(length0, eot)
        else:
            deep = args[1] if len(args) > 1 else kwargs.get("deep", ())
            observe = not rec.done and "observer" not in kwargs and len(deep) > 0
            if observe:
                rec.start(0)
        if not observe:
            return self._encoder(*args, **kwargs)
        try:
            return self._encoder(*args, observer=rec, **kwargs)
        finally:
            rec.done = True


def text_context_positions(model: nn.Module) -> list[int]:
    """Positions ``1..n`` of a model's learned layer-0 text context (end class-token position only)."""
    from restore.prompting.context import TextContext

    candidates = []
    learner = getattr(model, "prompt_learner", None)
    if isinstance(learner, TextContext):
        candidates.append(learner)
    if learner is not None and isinstance(getattr(learner, "text_context", None), TextContext):
        candidates.append(learner.text_context)
    candidates += [m for m in model.modules() if isinstance(m, TextContext)]
    for context in candidates:
        if context.ctx is None or context.n_ctx == 0:
            continue
        if context.class_token_position != "end":
            print(f"Note: feature shift ignores the layer-0 text context with class token position "
                  f"{context.class_token_position!r} (only 'end' is supported)")
            return []
        return list(range(1, 1 + context.n_ctx))
    return []


@contextlib.contextmanager
def observe_shift(model: nn.Module, text_layers: Iterable[int] | None = None,
                  vision_layers: Iterable[int] | None = None, text_positions: Sequence[int] | None = None,
                  eps: float = 1e-6) -> Iterator[ShiftRecording]:
    """Record block shifts of the next prompted text and image encoder calls made by ``model``.

    ``model`` is any :class:`~restore.prompting.trainer.PromptModel` (its ``text_encoder`` and
    ``image_encoder`` are temporarily wrapped). ``text_positions`` defaults to the learned layer-0
    context found in the model (:func:`text_context_positions`).
    """
    positions = text_context_positions(model) if text_positions is None else list(text_positions)
    recording = ShiftRecording(ShiftRecorder("text", text_layers, positions, eps),
                               ShiftRecorder("vision", vision_layers, (), eps))
    text_encoder, image_encoder = model.text_encoder, model.image_encoder
    object.__setattr__(model, "text_encoder", _ObservedEncoder(text_encoder, recording.text))
    object.__setattr__(model, "image_encoder", _ObservedEncoder(image_encoder, recording.vision))
    try:
        yield recording
    finally:
        object.__setattr__(model, "text_encoder", text_encoder)
        object.__setattr__(model, "image_encoder", image_encoder)


# --------------------------------------------------------------------------------------------
# Measuring a trained model
# --------------------------------------------------------------------------------------------

@dataclass
class ShiftProfile:
    """Per-layer shifts of one model (mean over classes for text, over images for vision)."""

    label: str
    layers: list[int]
    text: list[float]
    vision: list[float]
    num_images: int = 0
    num_classes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def discrepancy(self) -> list[float]:
        return [abs(t - v) for t, v in zip(self.text, self.vision)]


@torch.no_grad()
def measure_model_shift(model: nn.Module, images: Iterable[torch.Tensor], max_images: int = 64,
                        label: str = "", device: torch.device | None = None,
                        autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> ShiftProfile:
    """Per-layer text and vision feature shift of a prompt model, relative to frozen CLIP blocks.

    Text: every class prompt of the model once. Vision: up to ``max_images`` images from ``images``
    (tensors (B, 3, H, W) or batches with an ``"img"`` key).
    """
    model.eval()
    device = device or next(model.parameters()).device
    ctx = autocast or contextlib.nullcontext
    n_text = model.text_encoder.num_layers
    n_vision = model.image_encoder.num_layers
    n_layers = max(n_text, n_vision)
    with ctx(), observe_shift(model) as rec:
        model.encode_text()
    text = rec.text.vector(range(n_text)).cpu().tolist()
    vis_sum = torch.zeros(n_vision, dtype=torch.float64)
    seen = 0
    for batch in images:
        x = batch["img"] if isinstance(batch, dict) else batch
        x = x[: max_images - seen].to(device)
        if x.shape[0] == 0:
            break
        with ctx(), observe_shift(model) as rec:
            model.encode_image(x)
        for k, v in rec.vision.shifts.items():
            vis_sum[k] += v.double().sum().cpu()
        seen += x.shape[0]
        if seen >= max_images:
            break
    vision = (vis_sum / max(seen, 1)).tolist()
    text += [0.0] * (n_layers - n_text)
    vision += [0.0] * (n_layers - n_vision)
    return ShiftProfile(label, list(range(n_layers)), text, vision, seen, len(getattr(model, "classnames", [])))


# --------------------------------------------------------------------------------------------
# Rebuilding a trained run
# --------------------------------------------------------------------------------------------

def _saved_config(run_dir: str) -> Any:
    """The config a run saved beside its results (``config.yaml``, written by the trainer)."""
    from yacs.config import CfgNode

    from restore.engine.config import load_yaml
    from restore.engine.trainer import CONFIG_FILE

    path = osp.join(run_dir, CONFIG_FILE)
    if not osp.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass run directories written by the launcher (train.py)")
    return CfgNode(load_yaml(path))


def load_run(run_dir: str, root: str = "", split: str = "", device: str = "", epoch: int | None = None) -> Any:
    """Rebuild the trainer of a finished run (its saved ``config.yaml``) and load its checkpoint.

    ``root`` overrides DATASET.ROOT, ``split`` DATASET.SUBSAMPLE_CLASSES ("base", "new", "all").
    Nothing is written to the run directory.
    """
    import tempfile

    from restore.engine.config import extend_cfg, get_cfg_default
    from restore.engine.trainer import build_trainer
    from restore.methods import load_plugins

    load_plugins()
    logged = _saved_config(run_dir)
    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.merge_from_other_cfg(logged)
    if root:
        cfg.DATASET.ROOT = root
    if split:
        cfg.DATASET.SUBSAMPLE_CLASSES = split
    if device == "cpu":
        cfg.USE_CUDA = False
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="feature_shift_")
    cfg.MODEL.INIT_WEIGHTS = ""
    cfg.RESUME = ""
    cfg.VERBOSE = False
    cfg.freeze()
    trainer = build_trainer(cfg)
    if any(osp.isdir(osp.join(run_dir, name)) for name in trainer.get_model_names()):
        trainer.load_model(run_dir, epoch=epoch)
    else:
        print(f"Note: {run_dir} holds no checkpoint of {cfg.TRAINER.NAME}; measuring the untrained model")
    return trainer


def analyse_runs(run_dirs: Sequence[str], labels: Sequence[str] | None = None, root: str = "", split: str = "",
                 max_images: int = 64, device: str = "", epoch: int | None = None) -> list[ShiftProfile]:
    profiles = []
    for i, run_dir in enumerate(run_dirs):
        trainer = load_run(run_dir, root=root, split=split, device=device, epoch=epoch)
        label = labels[i] if labels and i < len(labels) else f"{trainer.cfg.TRAINER.NAME}:{osp.basename(osp.normpath(run_dir))}"
        autocast = getattr(trainer, "autocast", None)
        try:
            profile = measure_model_shift(trainer.model, trainer.test_loader, max_images=max_images, label=label,
                                          device=trainer.device, autocast=autocast)
        finally:
            import shutil

            shutil.rmtree(trainer.cfg.OUTPUT_DIR, ignore_errors=True)  # the scratch folder of load_run
        profile.meta = {"run_dir": run_dir, "trainer": trainer.cfg.TRAINER.NAME, "dataset": trainer.cfg.DATASET.NAME,
                        "split": trainer.cfg.DATASET.SUBSAMPLE_CLASSES, "backbone": trainer.cfg.MODEL.BACKBONE.NAME}
        profiles.append(profile)
        print(f"{label}: text {['%.4f' % v for v in profile.text]}")
        print(f"{' ' * len(label)}  vision {['%.4f' % v for v in profile.vision]}")
    return profiles


def write_csv(profiles: Sequence[ShiftProfile], path: str) -> str:
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "trainer", "dataset", "split", "layer", "shift_text", "shift_vision",
                         "discrepancy", "num_images", "num_classes"])
        for p in profiles:
            for k, t, v, d in zip(p.layers, p.text, p.vision, p.discrepancy):
                writer.writerow([p.label, p.meta.get("trainer", ""), p.meta.get("dataset", ""), p.meta.get("split", ""),
                                 k, f"{t:.6g}", f"{v:.6g}", f"{d:.6g}", p.num_images, p.num_classes])
    return path


def plot_profiles(profiles: Sequence[ShiftProfile], path: str, title: str = "") -> str:
    """Three panels (vision shift, text shift, |text - vision|) per block, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    panels = [("vision feature shift", "vision"), ("text feature shift", "text"),
              ("inter-modal discrepancy |s_t - s_v|", "discrepancy")]
    for ax, (name, attr) in zip(axes, panels):
        for p in profiles:
            ax.plot([k + 1 for k in p.layers], getattr(p, attr), marker="o", markersize=3, label=p.label)
        ax.set_title(name)
        ax.set_xlabel("transformer block")
        ax.set_ylabel("relative shift")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m restore.analysis.feature_shift",
        description="Per-layer vision/text feature shift (paper definition) of trained runs; CSV + PNG.")
    parser.add_argument("runs", nargs="+", help="run directories written by train.py (log.txt + checkpoint)")
    parser.add_argument("--root", default="", help="dataset root (default: the one in each run's config)")
    parser.add_argument("--split", default="", choices=["", "base", "new", "all"],
                        help="classes to measure (default: the run's DATASET.SUBSAMPLE_CLASSES)")
    parser.add_argument("--max-images", type=int, default=64, help="test images used for the vision shift")
    parser.add_argument("--labels", nargs="*", default=None, help="legend labels, one per run")
    parser.add_argument("--load-epoch", type=int, default=None, help="checkpoint epoch (default: the latest)")
    parser.add_argument("--device", default="", choices=["", "cpu", "cuda"])
    parser.add_argument("--out", default="feature_shift", help="output folder for feature_shift.csv/.png")
    args = parser.parse_args(argv)
    try:
        profiles = analyse_runs(args.runs, args.labels, root=args.root, split=args.split, max_images=args.max_images,
                                device=args.device, epoch=args.load_epoch)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 1
    csv_path = write_csv(profiles, osp.join(args.out, "feature_shift.csv"))
    png_path = plot_profiles(profiles, osp.join(args.out, "feature_shift.png"),
                             title=f"feature shift ({profiles[0].meta.get('dataset', '')}, "
                                   f"{profiles[0].meta.get('split', '')} classes)")
    print(f"Wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
