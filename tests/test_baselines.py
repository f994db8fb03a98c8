"""Per-method checks of the baseline trainers against hand computations, plus train.py end to end."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
from types import SimpleNamespace

import pytest
from helpers import run_train_py
import torch
import torch.nn.functional as F
from torch import nn

import trainers  # noqa: F401
from restore.clip.tokenizer import encode, tokenize
from restore.engine.config import extend_cfg, get_cfg_default, merge_file
from restore.engine.registry import TRAINER_REGISTRY
from restore.prompting.context import encode_fixed_prompts, zeroshot_classifier
from trainers.cocoop import CoCoOpModel
from trainers.coop import CoOpModel
from trainers.ivlp import IVLPModel
from trainers.kgcoop import KgCoOpModel, kg_loss
from trainers.maple import MaPLeModel, maple_num_params
from trainers.promptsrc import (TEACHER_TEMPLATES, GaussianPromptAggregation, PromptSRCModel, attach_gpa,
                                gpa_end_of_epoch, gpa_weights, self_consistency_losses)
from trainers.vpt import VPTModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["banded", "blotchy", "braided_hair"]



@pytest.fixture
def clip(tiny_clip):
    return copy.deepcopy(tiny_clip)


def node(name: str, **overrides):
    return SimpleNamespace(**{**TRAINER_REGISTRY.get(name).default_cfg, **overrides})


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- MaPLe

def test_maple_coupling_and_parameter_count(clip):
    torch.manual_seed(0)
    model = MaPLeModel(clip, CLASSES, n_ctx=2, depth=9)
    model.freeze()
    pl = model.prompt_learner
    groups = model.vision_deep()
    assert len(groups) == 1 and len(groups[0].tokens) == 9
    assert torch.allclose(groups[0].tokens[0], pl.proj(pl.ctx))
    for k, (text, proj) in enumerate(zip(pl.compound_prompts_text, pl.compound_prompt_projections)):
        assert torch.allclose(groups[0].tokens[k + 1], text @ proj.weight.t() + proj.bias)
    first = pl.compound_prompt_projections[0]
    for proj in pl.compound_prompt_projections[1:]:  # deep copies of one Linear
        assert torch.equal(proj.weight, first.weight) and torch.equal(proj.bias, first.bias)
    assert not torch.equal(pl.proj.weight, first.weight)
    # tiny widths: text 64, vision 128; ctx 2x64, proj 64x128+128, 8 x (2x64 + 64x128+128)
    hand = 2 * 64 + (64 * 128 + 128) + 8 * (2 * 64 + 64 * 128 + 128)
    assert hand == 76032
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == hand == maple_num_params(2, 9, 64, 128)
    assert maple_num_params(2, 9, 512, 768) == 3_555_072  # ViT-B/16 (restore.md §3.7)
    text_groups = model.text_deep()
    assert text_groups[0].first_layer == 1 and len(text_groups[0].tokens) == 8


def test_maple_hooks_override_vision_tokens_and_adapt_features(clip):
    torch.manual_seed(0)
    base = MaPLeModel(clip, CLASSES)

    class Custom(MaPLeModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.adapter = nn.Linear(48, 48)

        def deep_vision_tokens(self):
            return [torch.zeros_like(t) for t in super().deep_vision_tokens()]

        def adapt_image_features(self, x):
            return x + self.adapter(x)

    torch.manual_seed(0)
    custom = Custom(clip, CLASSES)
    learnable = custom.freeze()
    assert "adapter.weight" in learnable and "adapter.weight" in custom.checkpoint_state()
    assert all(torch.count_nonzero(t) == 0 for t in custom.vision_deep()[0].tokens[1:])
    x = images()
    with torch.no_grad():
        assert torch.allclose(base.encode_text(), custom.encode_text())  # text side untouched
        plain = base.image_encoder(x, base.vision_deep()).features
        zeroed = custom.image_encoder(x, custom.vision_deep()).features
        assert not torch.allclose(plain, zeroed)
        assert torch.allclose(custom.encode_image(x), zeroed + custom.adapter(zeroed), atol=1e-6)


# --------------------------------------------------------------------------- PromptSRC

def test_gpa_weights_are_a_normalised_gaussian():
    w = gpa_weights(3, 2, 1)
    raw = [math.exp(-0.5), 1.0, math.exp(-0.5)]
    assert w == pytest.approx([r / sum(raw) for r in raw])
    w = gpa_weights(4, 1.5, 2.0)
    raw = [math.exp(-((a - 1.5) ** 2) / 8.0) for a in range(1, 5)]
    assert w == pytest.approx([r / sum(raw) for r in raw])
    assert gpa_weights(2, 15, 1) == pytest.approx([math.exp(-98) / (math.exp(-98) + math.exp(-84.5)),
                                                    math.exp(-84.5) / (math.exp(-98) + math.exp(-84.5))])
    assert sum(gpa_weights(20, 15, 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        gpa_weights(3, 1, 0)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, 3))
        self.frozen_b = nn.Parameter(torch.zeros(4))

    def is_frozen_name(self, name):
        return name.startswith("frozen_")


def _toy_epochs(model, values, gpa, start=0):
    for epoch in range(start, len(values)):
        with torch.no_grad():
            model.a.fill_(values[epoch])
            model.frozen_b.fill_(values[epoch])
        gpa_end_of_epoch(model, epoch, len(values))


def test_gpa_aggregates_only_learnable_and_resumes_exactly():
    values = [1.0, 2.0, 4.0, 8.0]
    weights = gpa_weights(4, 2.5, 1.0)
    model = _Toy()
    gpa = attach_gpa(model, 4, 2.5, 1.0)
    assert gpa.names == ["a"]
    _toy_epochs(model, values, gpa)
    expected = sum(w * v for w, v in zip(weights, values))
    assert torch.allclose(model.a, torch.full((2, 3), expected))
    assert torch.equal(model.frozen_b, torch.full((4,), values[-1]))  # frozen: untouched by GPA

    # Interrupted after epoch 2, resumed from the saved state: same result.
    first = _Toy()
    attach_gpa(first, 4, 2.5, 1.0)
    for epoch in range(2):
        with torch.no_grad():
            first.a.fill_(values[epoch])
        first.gpa.accumulate(first, epoch)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    assert int(saved["gpa.epochs"]) == 2 and "gpa.sum__a" in saved
    resumed = _Toy()
    attach_gpa(resumed, 4, 2.5, 1.0)
    resumed.load_state_dict(saved)
    _toy_epochs(resumed, values, resumed.gpa, start=2)
    assert torch.allclose(resumed.a, model.a)
    with pytest.raises(RuntimeError):  # the aggregate and the loop must agree on the epoch
        resumed.gpa.accumulate(resumed, 1)


def test_promptsrc_gpa_state_is_checkpointed(clip):
    torch.manual_seed(0)
    model = PromptSRCModel(clip, CLASSES, node("PromptSRC"))
    attach_gpa(model, 2, 15, 1)
    model.freeze()
    assert not any(n.startswith("gpa") for n, p in model.named_parameters())
    gpa_end_of_epoch(model, 0, 2)
    state = model.checkpoint_state()
    learnable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert int(state["gpa.epochs"]) == 1
    assert {f"gpa.{GaussianPromptAggregation._key(n)}" for n in learnable} <= set(state)
    assert "frozen_teacher_text" not in state and not any(k.startswith("clip.") for k in state)
    other = PromptSRCModel(copy.deepcopy(clip), ["x", "y"], node("PromptSRC"))
    attach_gpa(other, 2, 15, 1)
    other.load_checkpoint_state(state, "test")
    assert int(other.gpa.epochs) == 1
    for n in learnable:
        assert torch.equal(other.gpa.running_sum(n), model.gpa.running_sum(n))
    gpa_end_of_epoch(other, 1, 2)  # finishes: parameters become the aggregate
    w = gpa_weights(2, 15, 1)
    name = "prompt_learner.text_context.ctx"
    params = dict(other.named_parameters())
    expected = model.gpa.running_sum(name) + w[1] * dict(model.named_parameters())[name].detach()
    assert torch.allclose(params[name], expected, atol=1e-6)  # other's ctx was loaded from model


def test_promptsrc_losses_match_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zs_logits = torch.tensor([[0.5, 0.5, 1.5], [2.0, 0.0, 1.0]])
    text = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    image = torch.tensor([[0.0, 5.0], [2.0, 0.0]])
    zs_image = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    terms = self_consistency_losses(logits, text, image, teacher, zs_image, zs_logits)

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def mean_abs(a, b):
        diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(unit(ra), unit(rb))]
        return sum(diffs) / len(diffs)

    def log_softmax(row):
        m = max(row)
        z = math.log(sum(math.exp(x - m) for x in row)) + m
        return [x - z for x in row]

    kl = 0.0
    for lp_row, lq_row in zip(logits.tolist(), zs_logits.tolist()):
        lp, lq = log_softmax(lp_row), log_softmax(lq_row)
        kl += sum(math.exp(q) * (q - p) for p, q in zip(lp, lq))
    kl /= 6
    assert terms["text"].item() == pytest.approx(mean_abs(text.tolist(), teacher.tolist()), rel=1e-5)
    assert terms["image"].item() == pytest.approx(mean_abs(image.tolist(), zs_image.tolist()), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    # same as PyTorch's kl_div(log p, log p_zs, sum, log_target) / numel
    ref = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zs_logits, -1), reduction="sum", log_target=True) / 6
    assert terms["kl"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_promptsrc_model_loss_and_teacher(clip):
    torch.manual_seed(0)
    model = PromptSRCModel(clip, CLASSES, node("PromptSRC"))
    model.freeze()
    # the official teacher: 60 distinct CLIP ImageNet templates, raw features averaged then
    # normalised, recomputed here with CLIP's own untruncated encode_text
    assert len(TEACHER_TEMPLATES) == len(set(TEACHER_TEMPLATES)) == 60
    assert {"a photo of a {}.", "itap of the {}.", "a bad photo of a {}."} <= set(TEACHER_TEMPLATES)
    with torch.no_grad():
        per_template = torch.stack([clip.encode_text(tokenize([t.format(c.replace("_", " ")) for c in CLASSES])).float()
                                    for t in TEACHER_TEMPLATES])
    expected_teacher = F.normalize(per_template.mean(0), dim=-1)
    assert torch.allclose(model.frozen_teacher_text, expected_teacher, atol=1e-5)
    clip_ensemble = F.normalize(F.normalize(per_template, dim=-1).mean(0), dim=-1)
    assert not torch.allclose(model.frozen_teacher_text, clip_ensemble, atol=1e-5)
    x, label = images(), torch.tensor([0, 2])
    model.train()
    out = model(x)
    zs = F.normalize(model.clip.encode_image(x).float(), dim=-1)
    assert torch.allclose(out.extras["zs_image_features"], zs, atol=1e-5)
    loss, summary = model.loss(out, label)
    terms = self_consistency_losses(out.logits, out.text_features, out.image_features, expected_teacher, zs,
                                    model.logit_scale * zs @ expected_teacher.t())
    hand = F.cross_entropy(out.logits, label) + 25 * terms["text"] + 10 * terms["image"] + terms["kl"]
    assert loss.item() == pytest.approx(hand.item(), rel=1e-4)
    assert set(summary) >= {"loss", "loss_ce", "loss_text", "loss_image", "loss_kl"}
    model.eval()
    with torch.no_grad():
        assert "zs_logits" not in model(x).extras  # no teacher pass at evaluation


# --------------------------------------------------------------------------- KgCoOp

def test_kgcoop_loss_matches_hand_computation(clip):
    learned = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    fixed = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # normalised: (0.6, 0.8) vs (1, 0): |d|^2 = 0.16 + 0.64 = 0.8; (0, 1) vs (0, 1): 0
    # default = the released code's 1 - mean cos; "l2" = the paper's squared distance (twice as large)
    assert kg_loss(learned, fixed).item() == pytest.approx(1 - (0.6 + 1.0) / 2)
    assert kg_loss(learned, fixed, "l2").item() == pytest.approx(0.4)
    with pytest.raises(ValueError):
        kg_loss(learned, fixed, "l1")

    torch.manual_seed(0)
    model = KgCoOpModel(clip, CLASSES, node("KgCoOp"), "{} texture.")
    model.freeze()
    assert model.prompt_learner.n_ctx == 4 and model.prompt_learner.prompt_prefix == "a photo of a"
    hand_fixed = encode_fixed_prompts(model.text_encoder, [f"{c.replace('_', ' ')} texture." for c in CLASSES])
    assert torch.allclose(model.frozen_clip_text, F.normalize(hand_fixed, dim=-1), atol=1e-6)
    assert "frozen_clip_text" not in model.checkpoint_state()
    x, label = images(), torch.tensor([1, 2])
    out = model(x)
    loss, summary = model.loss(out, label)
    cos = (F.normalize(out.text_features, dim=-1) * model.frozen_clip_text).sum(-1)
    hand = F.cross_entropy(out.logits, label) + 8.0 * (1 - cos.mean())
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert summary["loss_kg"] > 0


def test_kgcoop_teacher_uses_kgcoop_templates(clip):
    """KgCoOp's own DTD prompt (not CoOp's "{} texture."); other datasets keep CoOp's prompt."""
    from trainers.kgcoop import KGCOOP_TEMPLATES, KgCoOp

    assert KGCOOP_TEMPLATES["DescribableTextures"] == "a photo of a {}, a type of texture."
    assert KGCOOP_TEMPLATES["OxfordPets"] == "a photo of a {}, a type of pet."
    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.DATASET.NAME = "DescribableTextures"
    trainer = KgCoOp.__new__(KgCoOp)
    trainer.cfg, trainer.device = cfg, torch.device("cpu")
    assert trainer.method_cfg.DISTANCE == "cosine"
    model = trainer.build_prompt_model(cfg, CLASSES, clip)
    assert model.template == "a photo of a {}, a type of texture."


# --------------------------------------------------------------------------- CoCoOp

def test_cocoop_context_depends_on_the_image(clip):
    torch.manual_seed(0)
    model = CoCoOpModel(clip, CLASSES, n_ctx=4)
    model.freeze()
    assert not model.text_is_image_independent
    meta = model.prompt_learner.meta_net
    assert meta.linear1.in_features == 48 and meta.linear1.out_features == 3 and meta.linear2.out_features == 64
    x = images(2)
    with torch.no_grad():
        out = model(x)
        per_image = out.extras["text_features_per_image"]
        assert per_image.shape == (2, len(CLASSES), 48)
        assert not torch.allclose(per_image[0], per_image[1])
        for i in range(2):  # logits use each image's own text features
            assert torch.allclose(out.logits[i], model.logit_scale * out.image_features[i] @ per_image[i].t(), atol=1e-4)
        nn.init.zeros_(meta.linear2.weight)
        nn.init.zeros_(meta.linear2.bias)
        out = model(x)
        plain = F.normalize(model.encode_text(), dim=-1)
        assert torch.allclose(out.extras["text_features_per_image"][0], plain, atol=1e-6)
        assert torch.allclose(out.extras["text_features_per_image"][1], plain, atol=1e-6)
    with model.inference_cache():  # nothing cached for a conditional model
        assert model._cached_text is None


# --------------------------------------------------------------------------- IVLP / VPT

def test_ivlp_single_branch_variants(clip):
    language = IVLPModel(clip, CLASSES, node("IVLP", N_CTX_VISION=0, N_CTX_TEXT=4, PROMPT_DEPTH_VISION=0,
                                              PROMPT_DEPTH_TEXT=12))
    names = language.freeze()
    assert names and not any("vision" in n for n in names)
    assert language.vision_deep() == [] and len(language.text_deep()[0].tokens) == 11

    vision = IVLPModel(copy.deepcopy(clip), CLASSES, node("IVLP", N_CTX_VISION=4, N_CTX_TEXT=0,
                                                          PROMPT_DEPTH_VISION=12, PROMPT_DEPTH_TEXT=0))
    names = vision.freeze()
    assert names and all(n.startswith("prompt_learner.vision_prompts.") for n in names)
    assert vision.text_deep() == [] and vision.prompt_learner.text_context.ctx is None
    fixed = encode_fixed_prompts(vision.text_encoder, [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    assert torch.allclose(vision.encode_text(), fixed, atol=1e-5)
    assert vision.encode_text() is vision.encode_text()  # computed once

    both = IVLPModel(copy.deepcopy(clip), CLASSES, node("IVLP"))
    names = both.freeze()
    assert sum("vision_prompts" in n for n in names) == 9 and sum("text_prompts" in n for n in names) == 8


def test_vpt_has_only_vision_prompts_and_fixed_text(clip):
    model = VPTModel(clip, CLASSES, node("VPT", N_CTX_VISION=3, PROMPT_DEPTH_VISION=2))
    names = model.freeze()
    assert names == ["prompt_learner.vision_prompts.0", "prompt_learner.vision_prompts.1"]
    assert model.prompt_learner.text_context.prompts == [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    out = model.encode_image_output(images(1))
    assert out.tokens.shape[1] == 50 + 3 and out.slots["vision_prompts"] == slice(50, 53)


# --------------------------------------------------------------------------- CoOp

@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_coop_csc_and_class_token_position(clip, position, csc):
    torch.manual_seed(0)
    cfg = node("CoOp", N_CTX=4, CSC=csc, CLASS_TOKEN_POSITION=position)
    model = CoOpModel(clip, CLASSES, cfg)
    pl = model.prompt_learner
    assert pl.ctx.shape == ((len(CLASSES), 4, 64) if csc else (4, 64))
    prompts = pl()
    assert prompts.shape == (len(CLASSES), 77, 64)
    emb = clip.token_embedding.weight
    for i, name in enumerate(CLASSES):
        ids = encode(name.replace("_", " "))
        ctx = pl.ctx[i] if csc else pl.ctx
        if position == "end":
            ctx_at, name_at = 1, 1 + 4
        elif position == "front":
            name_at, ctx_at = 1, 1 + len(ids)
        else:
            ctx_at, name_at = 1, 1 + 2
        assert torch.allclose(prompts[i, name_at:name_at + len(ids)], emb[ids])
        if position == "middle":
            assert torch.allclose(prompts[i, 1:3], ctx[:2])
            assert torch.allclose(prompts[i, name_at + len(ids):name_at + len(ids) + 2], ctx[2:])
        else:
            assert torch.allclose(prompts[i, ctx_at:ctx_at + 4], ctx)
    with torch.no_grad():
        assert model(images(1)).logits.shape == (1, len(CLASSES))


# --------------------------------------------------------------------------- configs

MY_TRAINERS = ["CoOp", "CoCoOp", "IVLP", "VPT", "MaPLe", "PromptSRC", "KgCoOp", "ZeroshotCLIP"]
CONFIGS = sorted(p for t in MY_TRAINERS for p in glob.glob(os.path.join(ROOT, "configs", "trainers", t, "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs", "trainers")))
def test_trainer_configs_merge_with_the_published_shared_settings(path):
    cfg = get_cfg_default()
    extend_cfg(cfg)
    merge_file(cfg, path)
    assert cfg.DATALOADER.TEST.BATCH_SIZE == 100 and cfg.DATALOADER.NUM_WORKERS == 8
    assert tuple(cfg.INPUT.SIZE) == (224, 224) and cfg.INPUT.INTERPOLATION == "bicubic"
    assert list(cfg.INPUT.TRANSFORMS) == ["random_resized_crop", "random_flip", "normalize"]
    assert list(cfg.INPUT.PIXEL_MEAN) == [0.48145466, 0.4578275, 0.40821073]
    assert cfg.OPTIM.NAME == "sgd" and cfg.OPTIM.LR_SCHEDULER == "cosine"
    assert (cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR) == (1, "constant", 1e-5)
    prefixes = {"rn50": "RN50", "rn101": "RN101", "vit_b32": "ViT-B/32", "vit_b16": "ViT-B/16"}
    stem = os.path.basename(path)
    assert cfg.MODEL.BACKBONE.NAME == next(name for prefix, name in prefixes.items() if stem.startswith(prefix + "_")
                                           or stem == prefix + ".yaml")
    trainer = os.path.basename(os.path.dirname(path))
    node_cfg = cfg.TRAINER[TRAINER_REGISTRY.get(trainer).cfg_node_name()]
    assert node_cfg.PREC == "auto"  # published "fp16"; auto = bf16 where supported, else fp16


def test_published_values_of_key_configs():
    def load(rel):
        cfg = get_cfg_default()
        extend_cfg(cfg)
        merge_file(cfg, os.path.join(ROOT, "configs", "trainers", rel))
        return cfg

    cfg = load("MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml")
    assert (cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == (0.0035, 5, 4)
    assert (cfg.TRAINER.MAPLE.N_CTX, cfg.TRAINER.MAPLE.PROMPT_DEPTH) == (2, 9)
    cfg = load("PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml")
    p = cfg.TRAINER.PROMPTSRC
    assert (p.TEXT_LOSS_WEIGHT, p.IMAGE_LOSS_WEIGHT, p.GPA_MEAN, p.GPA_STD, cfg.OPTIM.MAX_EPOCH) == (25, 10, 15, 1, 20)
    cfg = load("CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml")
    assert (cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.TRAINER.COCOOP.N_CTX, cfg.TRAINER.COCOOP.CTX_INIT) == (1, 4, "a photo of a")
    cfg = load("IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml")
    assert (cfg.TRAINER.IVLP.N_CTX_VISION, cfg.TRAINER.IVLP.PROMPT_DEPTH_VISION, cfg.TRAINER.IVLP.N_CTX_TEXT) == (0, 0, 4)
    for name, epochs in (("rn50", 200), ("rn50_ep50", 50), ("rn101_ep100_ctxv1", 100)):
        cfg = load(f"CoOp/{name}.yaml")  # CoOp's own (RN50: its paper's few-shot backbone)
        assert (cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == (0.002, epochs, 32)
        assert cfg.TRAINER.COOP.CTX_INIT == ("a photo of a" if name.endswith("ctxv1") else "")
    cfg = load("KgCoOp/vit_b16_ep100_ctxv1.yaml")
    assert (cfg.TRAINER.KGCOOP.W, cfg.TRAINER.KGCOOP.N_CTX, cfg.OPTIM.MAX_EPOCH) == (8.0, 4, 100)


# --------------------------------------------------------------------------- end to end



@pytest.mark.parametrize("trainer,node_name,config,backbone", [
    ("CoOp", "COOP", "vit_b16_ep50.yaml", "tiny"),
    ("CoOp", "COOP", "rn50_ep50.yaml", "tiny-rn"),  # CoOp's RN50 configs, on the small random ResNet CLIP
    ("MaPLe", "MAPLE", "vit_b16_c2_ep5_batch4_2ctx.yaml", "tiny"),
])
def test_train_py_end_to_end_on_synthetic_dtd(trainer, node_name, config, backbone, tmp_path):
    synthetic = pytest.importorskip("restore.datasets.synthetic", reason="restore.datasets.synthetic (synthetic datasets) "
                                    "is not in this checkout yet")
    data = tmp_path / "data"
    synthetic.make_synthetic("dtd", str(data), num_classes=4, images_per_class=6)
    common = ["--root", str(data), "--trainer", trainer, "--seed", "1",
              "--config-file", os.path.join(ROOT, "configs", "trainers", trainer, config),
              "--dataset-config-file", os.path.join(ROOT, "configs", "datasets", "dtd.yaml")]
    small = ["MODEL.BACKBONE.NAME", backbone, "OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0",
             "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "DATASET.NUM_SHOTS", "2", "TRAIN.PRINT_FREQ", "1", "USE_CUDA", "False"]
    if trainer == "CoOp":
        small += [f"TRAINER.{node_name}.N_CTX", "4"]
    out = tmp_path / "train"
    assert run_train_py([*common, "--output-dir", str(out), *small, "DATASET.SUBSAMPLE_CLASSES", "base"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert 0.0 <= result["accuracy"] <= 100.0 and result["trainer"] == trainer and result["backbone"] == backbone
    model_name = TRAINER_REGISTRY.get(trainer).model_name
    assert (out / model_name / "model.pth.tar-1").is_file()

    test_out = tmp_path / "test_new"
    assert run_train_py([*common, "--output-dir", str(test_out), "--eval-only", "--model-dir", str(out), "--load-epoch",
                      "1", *small, "DATASET.SUBSAMPLE_CLASSES", "new"]) == 0
    result = json.loads((test_out / "results.json").read_text())
    assert result["split"] == "new" and 0.0 <= result["accuracy"] <= 100.0 and result["num_classes"] == 2


def test_promptsrc_gpa_through_train_py_and_resume(tmp_path):
    """GPA in the real loop: the last checkpoint holds the aggregate, and a run resumed after epoch 1
    (from that epoch's checkpoint) ends with the same weights as the uninterrupted run."""
    synthetic = pytest.importorskip("restore.datasets.synthetic", reason="restore.datasets.synthetic (synthetic datasets) "
                                    "is not in this checkout yet")
    import shutil

    from restore.engine.utils import load_checkpoint

    data = tmp_path / "data"
    synthetic.make_synthetic("dtd", str(data), num_classes=4, images_per_class=6)
    common = ["--root", str(data), "--trainer", "PromptSRC", "--seed", "1",
              "--config-file", os.path.join(ROOT, "configs", "trainers", "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx.yaml"),
              "--dataset-config-file", os.path.join(ROOT, "configs", "datasets", "dtd.yaml")]
    opts = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.5", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "DATASET.NUM_SHOTS", "2", "USE_CUDA", "False",
            "TRAINER.PROMPTSRC.GPA_MEAN", "1", "TRAINER.PROMPTSRC.GPA_STD", "1", "TRAIN.CHECKPOINT_FREQ", "1",
            "TEST.NO_TEST", "True", "DATASET.SUBSAMPLE_CLASSES", "base"]
    full = tmp_path / "full"
    assert run_train_py([*common, "--output-dir", str(full), *opts]) == 0
    ckpt_dir = full / "VLPromptLearner"
    last = load_checkpoint(str(ckpt_dir / "model.pth.tar-2"))["state_dict"]
    first = load_checkpoint(str(ckpt_dir / "model.pth.tar-1"))["state_dict"]
    assert int(first["gpa.epochs"]) == 1 and int(last["gpa.epochs"]) == 2
    key = "prompt_learner.text_context.ctx"
    agg = last["gpa.sum__prompt_learner__text_context__ctx"]
    assert torch.allclose(last[key], agg)  # the saved weights are the aggregate
    w = gpa_weights(2, 1, 1)
    assert torch.allclose(first["gpa.sum__prompt_learner__text_context__ctx"], w[0] * first[key])
    assert not torch.allclose(agg, first[key])

    resumed = tmp_path / "resumed"
    (resumed / "VLPromptLearner").mkdir(parents=True)
    shutil.copy(ckpt_dir / "model.pth.tar-1", resumed / "VLPromptLearner" / "model.pth.tar-1")
    (resumed / "VLPromptLearner" / "checkpoint").write_text("model.pth.tar-1\n")
    assert run_train_py([*common, "--output-dir", str(resumed), *opts]) == 0
    again = load_checkpoint(str(resumed / "VLPromptLearner" / "model.pth.tar-2"))["state_dict"]
    assert int(again["gpa.epochs"]) == 2
    for k in last:
        assert torch.allclose(again[k].float(), last[k].float(), atol=1e-6), k
