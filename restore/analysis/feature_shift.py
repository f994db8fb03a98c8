"""Feature-shift profiles of trained runs (text vs vision, per layer) and a CLI to compare runs.

The shift of a block is measured by :mod:`restore.prompting.shift` (the RESTORE paper's definition,
Eq. 6: the block output with vs without the prompts on the same input, relative per sample).

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
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from restore.engine.utils import error_message
from restore.prompting.shift import (
    ShiftRecorder,
    ShiftRecording,
    observe_shift,
    relative_block_shift,
    text_context_positions,
)

__all__ = [
    "ShiftRecorder", "ShiftRecording", "relative_block_shift", "observe_shift", "text_context_positions",
    "measure_model_shift", "ShiftProfile", "load_run", "analyse_runs", "write_csv", "plot_profiles", "main",
]

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
    n_text = int(model.text_encoder.num_layers)
    n_vision = int(model.image_encoder.num_layers)
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
