"""Milliseconds per RESTORE training step for each SHIFT mode (the Gram-norm proxy vs the paper's feature shift).

    python scripts/benchmark_shift_modes.py [--arch tiny|vit_b16] [--classes 50] [--device cuda] [--precision fp16]
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
import time
from typing import Sequence

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from restore.clip.model import CLIP, TINY_CONFIG, CLIPConfig  # noqa: E402
from restore.engine.config import extend_cfg, get_cfg_default  # noqa: E402
from trainers.restore_trainer import RestoreMaPLeModel  # noqa: E402


def benchmark_shift_modes(arch: str = "tiny", num_classes: int = 50, batch_size: int = 4, steps: int = 5,
                          warmup: int = 2, device: str = "cpu", precision: str = "fp32",
                          modes: Sequence[str] = ("prompt", "feature")) -> dict[str, float]:
    """Milliseconds per training step (forward + loss + backward + SGD step) for each SHIFT mode.

    ``arch``: "tiny" (the test CLIP) or "vit_b16" (ViT-B/16 widths, random weights: same cost as the
    real backbone). ``precision`` "fp16"/"bf16" autocast on CUDA. Returns ``{mode: ms_per_step}``,
    plus ``"feature_overhead"`` (ratio - 1) when both modes are measured.
    """
    configs = {"tiny": TINY_CONFIG,
               "vit_b16": CLIPConfig(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                     vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                                     transformer_heads=8, transformer_layers=12)}
    dev = torch.device(device)
    torch.manual_seed(0)
    clip = CLIP(configs[arch]).eval().to(dev)
    classnames = [f"class number {i}" for i in range(num_classes)]
    cfg = get_cfg_default()
    extend_cfg(cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if dev.type == "cuda" else None
    images = torch.randn(batch_size, 3, clip.visual.input_resolution, clip.visual.input_resolution, device=dev)
    labels = torch.randint(0, num_classes, (batch_size,), device=dev)
    models, optims, times = {}, {}, {}
    for mode in modes:
        node = cfg.TRAINER.RESTORE.clone()
        node.SHIFT = mode
        model = RestoreMaPLeModel(clip, classnames, node).to(dev)
        model.freeze()
        models[mode] = model.train()
        optims[mode] = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times[mode] = []
    for step in range(warmup + steps):  # modes interleaved step by step: fair under a varying machine load
        for mode in modes:
            model, optim = models[mode], optims[mode]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False):
                loss, _ = model.loss(model(images), labels)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[mode].append(time.perf_counter() - start)
    results = {mode: 1000 * sorted(t)[len(t) // 2] for mode, t in times.items()}  # medians
    if "prompt" in results and "feature" in results:
        results["feature_overhead"] = results["feature"] / results["prompt"] - 1
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time RESTORE's two feature-shift modes (ms per training step)")
    parser.add_argument("--arch", default="tiny", choices=["tiny", "vit_b16"])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args(argv)
    res = benchmark_shift_modes(args.arch, args.classes, args.batch, args.steps, device=args.device,
                                precision=args.precision)
    print(f"arch {args.arch}, {args.classes} classes, batch {args.batch}, {args.device} {args.precision}: "
          f"prompt {res['prompt']:.1f} ms/step, feature {res['feature']:.1f} ms/step "
          f"(+{100 * res['feature_overhead']:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
