"""CUDA and mixed-precision paths, skipped without a GPU (CI and laptops have none).

On a machine with a GPU: ``python -m pytest -q tests/test_cuda.py``. Every trainer takes training
steps in every precision (frozen CLIP in the working dtype, learnable tensors fp32, a GradScaler
exactly for fp16/amp), evaluates with cached text, and a whole train.py run with ``PREC auto``
round-trips through its checkpoint; the CPU memory estimate of the benchmark is checked against
CUDA's own peak for the same step.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import run_train_py

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ["auto", "fp16", "amp", "bf16", "fp32"]


def _trainer_names() -> list[str]:
    import trainers  # noqa: F401
    from restore.engine.registry import TRAINER_REGISTRY
    from restore.prompting.trainer import PromptTrainer

    return sorted(n for n in TRAINER_REGISTRY.registered_names() if issubclass(TRAINER_REGISTRY.get(n), PromptTrainer))


@pytest.fixture(scope="module")
def tiny_cuda_clip():
    from restore.clip.model import CLIP, TINY_CONFIG

    torch.manual_seed(0)
    return CLIP(TINY_CONFIG).eval()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", _trainer_names())
def test_cuda_steps_and_evaluation_in_every_precision(name, precision, tiny_cuda_clip):
    from restore.benchmark import _batch, _train_step, build_bench_trainer, synthetic_classnames
    from restore.prompting.trainer import resolve_precision

    device = torch.device("cuda")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    trainer = build_bench_trainer(name, tiny_cuda_clip, synthetic_classnames(5), device, precision)
    resolved = resolve_precision(precision, device)
    assert trainer.precision == resolved
    clip_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolved, torch.float32)
    assert {p.dtype for n, p in trainer.model.clip.named_parameters() if n != "logit_scale"} == {clip_dtype}
    assert trainer.model.clip.logit_scale.dtype == torch.float32
    assert (trainer.scaler is not None) == (resolved in ("fp16", "amp"))
    resolution = tiny_cuda_clip.visual.input_resolution
    learnable = [p for p in trainer.model.parameters() if p.requires_grad]
    if trainer.optim is not None:
        assert learnable and all(p.dtype == torch.float32 and p.is_cuda for p in learnable)
        before = [p.detach().clone() for p in learnable]
        trainer.set_model_mode("train")
        step = _train_step(trainer, _batch(2, 5, resolution, device, seed=1))
        for _ in range(4):  # fp16's GradScaler may skip the first steps (scale too large)
            step()
        assert all(torch.isfinite(p).all() for p in learnable)
        assert any(not torch.equal(p, b) for p, b in zip(learnable, before)), "no parameter was updated"
    trainer.set_model_mode("eval")
    images = _batch(3, 5, resolution, device, seed=2)["img"]
    with torch.no_grad(), trainer.inference_context():
        first = trainer.model_inference(images)
        again = trainer.model_inference(images)
    assert first.shape == (3, 5) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.allclose(first, again, rtol=1e-5, atol=1e-5)  # cached text features: same logits every batch


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_resnet_backbone_keeps_batchnorm_fp32_and_its_statistics(precision):
    from restore.benchmark import _batch, _train_step, build_bench_trainer, synthetic_classnames
    from restore.clip.model import CLIP, TINY_RN_CONFIG

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    device = torch.device("cuda")
    torch.manual_seed(0)
    clip_model = CLIP(TINY_RN_CONFIG).eval()
    trainer = build_bench_trainer("CoOp", clip_model, synthetic_classnames(5), device, precision)
    visual = trainer.model.clip.visual
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert visual.conv1.weight.dtype == dtype and visual.bn1.weight.dtype == visual.bn1.running_var.dtype == torch.float32
    stats = {k: v.clone() for k, v in visual.state_dict().items() if "running" in k}
    trainer.set_model_mode("train")
    step = _train_step(trainer, _batch(2, 5, 224, device, seed=1))
    for _ in range(4):
        step()
    assert all(torch.equal(visual.state_dict()[k], v) for k, v in stats.items())
    trainer.set_model_mode("eval")
    with torch.no_grad(), trainer.inference_context():
        logits = trainer.model_inference(_batch(3, 5, 224, device, seed=2)["img"])
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()


def test_cuda_train_py_round_trip_with_auto_precision(tmp_path):
    from restore.datasets.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic("dtd", str(data))
    out = tmp_path / "run"
    common = ["--root", str(data), "--seed", "1", "--trainer", "CoOp", "--dataset-config-file",
              os.path.join(ROOT, "configs/datasets/dtd.yaml"), "--output-dir", str(out)]
    opts = ["MODEL.BACKBONE.NAME", "tiny", "DATASET.NUM_SHOTS", "2", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "OPTIM.MAX_EPOCH", "2", "TRAINER.COOP.N_CTX", "4",
            "TRAINER.COOP.PREC", "auto"]
    assert run_train_py(common + opts) == 0
    trained = json.loads((out / "results.json").read_text())
    assert math.isfinite(trained["accuracy"])
    assert run_train_py(common + ["--eval-only", "--model-dir", str(out), "--load-epoch", "2",
                                  "--output-dir", str(tmp_path / "eval")] + opts) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])


def test_cpu_memory_estimate_matches_cuda_peak(tiny_cuda_clip):
    """LiveTensorMemory on the CUDA step itself vs torch.cuda.max_memory_allocated for the same step."""
    from restore.benchmark import LiveTensorMemory, _batch, _state_tensors, _train_step, build_bench_trainer
    from restore.benchmark import synthetic_classnames

    device = torch.device("cuda")
    trainer = build_bench_trainer("MaPLe", tiny_cuda_clip, synthetic_classnames(100), device, "bf16"
                                  if torch.cuda.is_bf16_supported() else "fp16")
    trainer.set_model_mode("train")
    step = _train_step(trainer, _batch(4, 100, tiny_cuda_clip.visual.input_resolution, device, seed=1))
    step()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with LiveTensorMemory(_state_tensors(trainer)) as tracker:
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    print(f"LiveTensorMemory peak {tracker.peak / 2**20:.1f} MiB, CUDA peak {peak / 2**20:.1f} MiB "
          f"(allocated before the step {baseline / 2**20:.1f} MiB)")
    assert 0.5 * peak <= tracker.peak <= 1.5 * peak
