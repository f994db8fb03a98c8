"""Every registered trainer, generically: what learns, checkpoint round trip, loading for new classes.

Trainers registered later are picked up automatically (as timm tests every model). A trainer that
needs smaller settings on the tiny CLIP (12 layers per tower, widths 64 text / 128 vision) adds
them to ``TINY_OVERRIDES``; trainers that learn nothing are listed in ``NOTHING_TO_LEARN``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import trainers  # noqa: F401  registers every trainer
from restore.engine.config import extend_cfg, get_cfg_default
from restore.engine.registry import TRAINER_REGISTRY
from restore.engine.trainer import TrainerBase
from restore.prompting.trainer import PromptModel

TRAINER_NAMES = sorted(TRAINER_REGISTRY.registered_names())

# Per trainer: small values of its own TRAINER.<NAME> node for the tiny backbone (default: its default_cfg).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "CoOp": {"N_CTX": 4},
    "CoCoOp": {"N_CTX": 4},
}
# Per trainer: other cfg keys ("A.B.C": value) it needs.
CFG_OVERRIDES: dict[str, dict[str, Any]] = {}
NOTHING_TO_LEARN = {"ZeroshotCLIP"}

BASE_CLASSES = ["banded", "blotchy", "braided_hair", "bubbly"]
NEW_CLASSES = ["cracked", "dotted", "zig_zagged"]


def _set(cfg: Any, dotted: str, value: Any) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def make_cfg(name: str, **node_overrides: Any) -> Any:
    """Default config + every trainer's node + tiny-CLIP settings for trainer ``name``."""
    cfg = get_cfg_default()
    extend_cfg(cfg)
    cls = TRAINER_REGISTRY.get(name)
    cls.extend_cfg(cfg)
    cfg.TRAINER.NAME = name
    cfg.DATASET.NAME = "DescribableTextures"
    cfg.MODEL.BACKBONE.NAME = "tiny"
    cfg.INPUT.SIZE = (224, 224)
    cfg.OPTIM.MAX_EPOCH = 2
    for dotted, value in CFG_OVERRIDES.get(name, {}).items():
        _set(cfg, dotted, value)
    node = cfg.TRAINER[cls.cfg_node_name()]
    for key, value in {**TINY_OVERRIDES.get(name, {}), **node_overrides}.items():
        node[key] = value
    return cfg


def lightweight_trainer(name: str, cfg: Any, classnames: list[str]) -> Any:
    """A trainer instance with cfg and device set, without data loaders (enough for build_prompt_model)."""
    cls = TRAINER_REGISTRY.get(name)
    trainer = object.__new__(cls)
    TrainerBase.__init__(trainer)
    trainer.cfg = cfg
    trainer.device = torch.device("cpu")
    trainer.precision = "fp32"
    trainer.autocast_dtype = None
    trainer.num_classes = len(classnames)
    trainer.lab2cname = dict(enumerate(classnames))
    trainer.max_epoch = cfg.OPTIM.MAX_EPOCH
    return trainer


def build_model(name: str, clip_model: Any, classnames: list[str], seed: int = 0, **node_overrides: Any) -> PromptModel:
    cfg = make_cfg(name, **node_overrides)
    trainer = lightweight_trainer(name, cfg, classnames)
    torch.manual_seed(seed)
    model = trainer.build_prompt_model(cfg, list(classnames), copy.deepcopy(clip_model))
    model.freeze()
    return model


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g)



@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _images()


def test_every_trainer_is_covered():
    assert {"CoOp", "CoCoOp", "IVLP", "VPT", "MaPLe", "PromptSRC", "KgCoOp", "ZeroshotCLIP"} <= set(TRAINER_NAMES)


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_learns_only_its_prompts_and_checkpoints_round_trip(name, tiny_clip, images, tmp_path):
    model = build_model(name, tiny_clip, BASE_CLASSES)
    learnable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(not p.requires_grad for p in model.clip.parameters()), "CLIP must be frozen"
    assert learnable == {n for n, _ in model.named_parameters() if not model.is_frozen_name(n)}

    if name in NOTHING_TO_LEARN:
        assert not learnable and model.checkpoint_state() == {}
        model.eval()
        with torch.no_grad(), model.inference_cache():
            assert model(images).logits.shape == (len(images), len(BASE_CLASSES))
        return
    assert learnable, f"{name} has no learnable parameter; add it to NOTHING_TO_LEARN if that is intended"

    # One optimisation step on the method's loss: gradients reach exactly the learnable tensors.
    label = torch.arange(len(images)) % len(BASE_CLASSES)
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    learn_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    output = model(images)
    assert output.logits.shape == (len(images), len(BASE_CLASSES))
    loss, summary = model.loss(output, label)
    assert torch.isfinite(loss) and "loss" in summary
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, clip_before[k]), f"frozen clip.{k} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, learn_before[n])]
    assert set(changed) == set(learn_before)

    # Only learned (and persistent method) state is saved; CLIP weights never are.
    state = model.checkpoint_state()
    assert state and not any(k.startswith("clip.") for k in state)
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)

    model.eval()
    with torch.no_grad():
        expected = model(images).logits
        with model.inference_cache():
            assert torch.allclose(model(images).logits, expected, atol=1e-5)

    fresh = build_model(name, tiny_clip, BASE_CLASSES, seed=123)
    fresh.load_checkpoint_state(loaded, str(path))
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(images).logits, expected, atol=1e-5)

    # The same checkpoint loads into a model built for other classes (base -> new).
    new = build_model(name, tiny_clip, NEW_CLASSES, seed=7)
    new.load_checkpoint_state(loaded, str(path))
    new.eval()
    with torch.no_grad(), new.inference_cache():
        logits = new(images).logits
    assert logits.shape == (len(images), len(NEW_CLASSES)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("precision", ["bf16", "amp"])
@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_runs_in_mixed_precision(name, precision, tiny_clip, images):
    """As PromptTrainer does on GPU: frozen CLIP in the working dtype ("bf16") or fp32 ("amp"), under
    autocast; here CPU autocast with bfloat16. Learnable tensors stay fp32 and get finite gradients."""
    model = build_model(name, tiny_clip, BASE_CLASSES)
    if precision == "bf16":
        model.clip.to(torch.bfloat16)
    label = torch.arange(2) % len(BASE_CLASSES)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images[:2])
        loss, _ = model.loss(output, label)
    assert torch.isfinite(loss)
    if name not in NOTHING_TO_LEARN:
        loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), model.inference_cache():
        logits = model(images[:2]).logits
    assert logits.shape == (2, len(BASE_CLASSES)) and torch.isfinite(logits).all()


def test_auto_precision_is_bf16_where_supported_else_fp16_and_fp32_on_cpu(monkeypatch):
    from restore.prompting.trainer import PRECISIONS, autocast_dtype, resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for precision in PRECISIONS:
        assert resolve_precision(precision, cpu) == "fp32" and autocast_dtype(precision, cpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16" and autocast_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp16" and autocast_dtype("auto", cuda) == torch.float16
    assert [autocast_dtype(p, cuda) for p in ("fp32", "fp16", "amp", "bf16")] == [
        None, torch.float16, torch.float16, torch.bfloat16]
    for name in TRAINER_NAMES:
        cfg = get_cfg_default()
        extend_cfg(cfg)
        expected = "amp" if name == "MMRL" else "auto"  # MMRL's official code trains under fp16 autocast
        assert cfg.TRAINER[TRAINER_REGISTRY.get(name).cfg_node_name()].PREC == expected, name


# --- ResNet backbones ---------------------------------------------------------------------------
# Methods that prompt only the text side run on CLIP's ResNets (CoOp's RN50 configs); the others
# put tokens into the image transformer and must say that they need a ViT.
RESNET_TRAINERS = {"ZeroshotCLIP", "CoOp", "CoCoOp", "KgCoOp"}


@pytest.fixture(scope="module")
def tiny_rn_clip():
    from restore.clip.model import CLIP, TINY_RN_CONFIG

    torch.manual_seed(0)
    model = CLIP(TINY_RN_CONFIG).eval()
    with torch.no_grad():  # pretrained-like statistics, which batch statistics would differ from
        for module in model.visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def rn_images() -> torch.Tensor:
    """Noise plus a different colour per image: a ResNet's attention pooling averages noise away, so
    images that differ only in their noise would give nearly the same features."""
    colours = torch.tensor([[1.5, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 1.5], [1.0, 1.0, -1.0]])
    return 0.5 * _images() + colours[:, :, None, None]


def _check_resnet_training_step(model: PromptModel, images: torch.Tensor) -> None:
    """A training step leaves the ResNet's BatchNorm statistics alone and its image features equal to
    eval mode's; gradients reach the learnable tensors only."""
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    model.train()
    assert not any(m.training for m in model.clip.modules() if isinstance(m, torch.nn.BatchNorm2d))
    output = model(images)
    label = torch.arange(len(images)) % output.logits.shape[1]
    loss, _ = model.loss(output, label)
    learnable = [p for p in model.parameters() if p.requires_grad]
    if learnable:
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learnable)
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, clip_before[key]), f"clip.{key} changed in a training step"
    model.eval()
    with torch.no_grad(), model.inference_cache():
        evaluated = model(images)
    assert torch.allclose(output.image_features, evaluated.image_features, atol=1e-6)
    assert torch.allclose(output.logits, evaluated.logits, atol=1e-4)


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_resnet_backbone_runs_text_prompt_methods_and_refuses_visual_prompts(name, tiny_rn_clip, rn_images):
    if name not in RESNET_TRAINERS:
        with pytest.raises(ValueError, match="ResNet") as err:
            build_model(name, tiny_rn_clip, BASE_CLASSES)
        assert "ViT-B/16" in str(err.value) and "text side" in str(err.value)
        return
    _check_resnet_training_step(build_model(name, tiny_rn_clip, BASE_CLASSES), rn_images)


def test_language_only_ivlp_runs_on_a_resnet(tiny_rn_clip, rn_images):
    model = build_model("IVLP", tiny_rn_clip, BASE_CLASSES, N_CTX_VISION=0, PROMPT_DEPTH_VISION=0, N_CTX_TEXT=2)
    assert not any("vision" in n for n, p in model.named_parameters() if p.requires_grad)
    _check_resnet_training_step(model, rn_images)


@pytest.mark.parametrize("name", ["CoOp", "CoCoOp"])
def test_resnet_in_the_bf16_working_precision_keeps_batchnorm_fp32(name, tiny_rn_clip, rn_images):
    """The GPU path of PREC bf16 (frozen CLIP cast, autocast), emulated on CPU: convolutions run in
    bf16, BatchNorm keeps fp32 statistics that training never touches, and logits stay close to fp32."""
    from restore.benchmark import _batch, _train_step, build_bench_trainer, synthetic_classnames

    device = torch.device("cpu")
    reference = build_bench_trainer(name, tiny_rn_clip, synthetic_classnames(5), device, "fp32")
    trainer = build_bench_trainer(name, tiny_rn_clip, synthetic_classnames(5), device, "bf16")
    visual = trainer.model.clip.visual
    assert visual.conv1.weight.dtype == torch.bfloat16 and visual.attnpool.c_proj.weight.dtype == torch.bfloat16
    bn = visual.layer2[0].bn2
    assert bn.weight.dtype == bn.running_var.dtype == torch.float32
    assert torch.equal(bn.running_var, tiny_rn_clip.visual.layer2[0].bn2.running_var)  # not rounded to bf16
    images = rn_images[:2]
    with torch.no_grad():
        expected = reference.model.encode_image(images)
        with trainer.autocast():
            got = trainer.model.encode_image(images).float()
    assert (expected[0] - expected[1]).abs().max() > 0.2 * expected.abs().max()  # features depend on the image
    assert torch.allclose(got, expected, atol=0.03 * expected.abs().max().item())
    trainer.set_model_mode("train")
    _train_step(trainer, _batch(2, 5, 224, device, seed=1))()
    assert torch.equal(bn.running_var, tiny_rn_clip.visual.layer2[0].bn2.running_var)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)
