"""RESTORE: feature-shift loss (both definitions), surgery, guided ratios, checkpoints, runs, analysis."""

from __future__ import annotations

import copy
import csv
import json
import os

import pytest
from helpers import run_train_py
import torch

import trainers  # noqa: F401  registers the trainers
from restore.analysis.feature_shift import observe_shift, relative_block_shift
from restore.engine.config import extend_cfg, get_cfg_default
from restore.prompting.trainer import PromptOutput
from trainers.restore_trainer import (RestoreMaPLeModel, RestorePromptSRCModel, SurgeryAdapter, gram_norms,
                                      restore_num_params)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["banded", "blotchy", "braided_rope"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tiny models are too small to gain from threads; one thread avoids contention on busy CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def node(**overrides):
    cfg = get_cfg_default()
    extend_cfg(cfg)
    n = cfg.TRAINER.RESTORE.clone()
    for key, value in overrides.items():
        n[key] = value
    return n


def build(tiny_clip, seed=0, base="maple", classes=CLASSES, **overrides):
    torch.manual_seed(seed)
    cls = RestoreMaPLeModel if base == "maple" else RestorePromptSRCModel
    model = cls(copy.deepcopy(tiny_clip), classes, node(**overrides))
    model.freeze()
    return model.train()


def images(n=2, seed=1):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def frob_gram(p: torch.Tensor) -> torch.Tensor:
    """||P P^T||_F written out: sqrt(sum_ij (p_i . p_j)^2)."""
    total = torch.zeros((), dtype=torch.float64)
    for a in p.double():
        for b in p.double():
            total += (a @ b) ** 2
    return total.sqrt()


# ------------------------------------------------------------------ loss values

def test_gram_norm_hand_values():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert torch.allclose(gram_norms([p]), torch.tensor([17 ** 0.5]))
    q = torch.randn(2, 7)
    assert torch.allclose(gram_norms([q])[0].double(), frob_gram(q), atol=1e-5)
    assert torch.allclose(gram_norms([q]), torch.linalg.matrix_norm(q.t() @ q)[None], atol=1e-5)  # d x d Gram


def test_prompt_mode_fs_loss_against_hand_computation(tiny_clip):
    model = build(tiny_clip)
    learner = model.prompt_learner
    out = model(images())
    loss0, summary0 = model.loss(out, torch.tensor([0, 1]))
    assert summary0["loss_fs"] == 0.0  # references captured at this first step: both ratios are exactly 1
    ref_t = [frob_gram(p.detach()) for p in learner.compound_prompts_text]
    ref_v = [frob_gram((lin(p)).detach()) for lin, p in zip(learner.compound_prompt_projections,
                                                              learner.compound_prompts_text)]
    assert torch.allclose(model.fs_ref_text.double(), torch.stack(ref_t), atol=1e-5)
    with torch.no_grad():  # move the prompts: text layer k scaled by (1 + k/4), vision maps unchanged
        for k, p in enumerate(learner.compound_prompts_text):
            p.mul_(1 + k / 4)
    expected = torch.zeros((), dtype=torch.float64)
    for k, (lin, p) in enumerate(zip(learner.compound_prompt_projections, learner.compound_prompts_text)):
        s_t = frob_gram(p.detach()) / ref_t[k]
        s_v = frob_gram(lin(p).detach()) / ref_v[k]
        expected += (s_t - s_v) ** 2
    assert expected > 0
    fs, _, _ = model.fs_loss()
    assert torch.allclose(fs.double(), expected, rtol=1e-4)
    out = model(images())
    loss, summary = model.loss(out, torch.tensor([0, 1]))
    assert summary["loss_fs"] == pytest.approx(float(expected), rel=1e-4)
    ce = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1]))
    assert float(loss.detach()) == pytest.approx(float(ce.detach()) + 1.0 * float(expected), rel=1e-5)


def test_relative_block_shift_hand_computed():
    """Toy block: every token gets the mean of the tokens it sees. Token 2 is a prompt."""
    def block(x, mask):
        if mask is None:
            return x + x.mean(dim=1, keepdim=True)
        weights = torch.tril(torch.ones(x.shape[1], x.shape[1]))
        weights = weights / weights.sum(dim=1, keepdim=True)
        return x + weights @ x

    a, b, p = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([3.0, 3.0])
    x = torch.stack([a, b, p])[None]
    mask = torch.tensor([False, False, True])
    # vision (full attention): with = x_i + (a+b+p)/3, without = x_i + (a+b)/2 on the kept tokens a, b
    shift = relative_block_shift(block, x, block(x, None), mask, causal=False)
    d = (a + b + p) / 3 - (a + b) / 2
    without = torch.stack([a + (a + b) / 2, b + (a + b) / 2])
    expected = (2 * d.pow(2).sum()).sqrt() / without.norm()
    assert torch.allclose(shift, expected[None], atol=1e-6)
    # text (causal): prompt at position 1 (between a and b); a never sees it, b does
    x = torch.stack([a, p, b])[None]
    mask = torch.tensor([False, True, False])
    shift = relative_block_shift(block, x, block(x, torch.zeros(3, 3)), mask, causal=True)
    with_b = b + (a + p + b) / 3
    without_kept = torch.stack([a + a, b + (a + b) / 2])
    expected = (with_b - (b + (a + b) / 2)).norm() / without_kept.norm()
    assert torch.allclose(shift, expected[None], atol=1e-6)
    # EOT at position 0 of the prompted sequence: only token a counts, which the prompt cannot reach
    shift = relative_block_shift(block, x, block(x, torch.zeros(3, 3)), mask, causal=True,
                                 eot_index=torch.tensor([0]))
    assert float(shift) == 0.0


def test_feature_mode_fs_loss_hand_computed_and_normalised(tiny_clip):
    model = build(tiny_clip, SHIFT="feature")
    k = len(model.fs_layers)
    s_t = torch.linspace(0.1, 0.8, k)
    s_v = torch.linspace(0.2, 0.5, k)
    out = PromptOutput(torch.zeros(1, 3), extras={"shift_text": s_t, "shift_vision": s_v})
    fs, _, _ = model.fs_loss(out)
    assert torch.allclose(fs, ((s_t - s_v) ** 2).sum())
    # equal shifts: zero loss
    same = PromptOutput(torch.zeros(1, 3), extras={"shift_text": s_t, "shift_vision": s_t.clone()})
    assert float(model.fs_loss(same)[0]) == 0.0
    # first-step normalisation: the first call sets the reference (loss 0), later calls divide by it
    model = build(tiny_clip, SHIFT="feature", FEATURE_NORM="first_step")
    assert float(model.fs_loss(out)[0]) == 0.0
    later = PromptOutput(torch.zeros(1, 3), extras={"shift_text": 2 * s_t, "shift_vision": 3 * s_v})
    assert torch.allclose(model.fs_loss(later)[0], torch.tensor(float(k)))  # (2 - 3)^2 per layer


def test_feature_mode_training_step_measures_real_shifts(tiny_clip):
    model = build(tiny_clip, SHIFT="feature")
    out = model(images())
    assert out.extras["shift_text"].shape == (8,) and (out.extras["shift_text"] > 0).all()
    assert (out.extras["shift_vision"] > 0).all()
    loss, summary = model.loss(out, torch.tensor([0, 2]))
    expected = ((out.extras["shift_text"] - out.extras["shift_vision"]) ** 2).sum()
    assert summary["loss_fs"] == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    # the shift gradient reaches the deep prompts (CE alone would too; check the FS term on its own)
    model.zero_grad()
    fs, _, _ = model.fs_loss(model(images()))
    fs.backward()
    assert model.prompt_learner.compound_prompts_text[3].grad.abs().sum() > 0


# ------------------------------------------------------------------ paper-mode shift: zero iff no effect

def _zero_attention(clip):
    clip = copy.deepcopy(clip)
    with torch.no_grad():
        for tower in (clip.transformer, clip.visual.transformer):
            for block in tower.resblocks:
                block.attn.out_proj.weight.zero_()
                block.attn.out_proj.bias.zero_()
    return clip


@torch.no_grad()
def test_paper_shift_zero_when_prompts_cannot_act_positive_otherwise(tiny_clip):
    model = build(tiny_clip).eval()
    with observe_shift(model) as rec:
        model.encode_text()
        model.encode_image(images())
    text, vision = rec.text.layer_means(), rec.vision.layer_means()
    assert sorted(text) == list(range(12)) and sorted(vision) == list(range(12))  # prompt tokens in every block
    assert all(float(v) > 0 for v in text.values()) and all(float(v) > 0 for v in vision.values())
    # without attention (out_proj = 0) a token's output depends on itself only: removing prompts changes nothing
    blind = build(_zero_attention(tiny_clip)).eval()
    with observe_shift(blind) as rec:
        blind.encode_text()
        blind.encode_image(images())
    for values in (rec.text.layer_means(), rec.vision.layer_means()):
        assert len(values) == 12
        assert max(abs(float(v)) for v in values.values()) < 1e-6


# ------------------------------------------------------------------ surgery and guided ratios

def test_surgery_identity_at_zero_and_mixing_identity():
    torch.manual_seed(0)
    adapter = SurgeryAdapter(16, 64)
    x = torch.randn(5, 16)
    assert torch.equal(adapter.mix(x, torch.tensor(0.0)), x)
    r = 0.3
    ffn = adapter.down(adapter.act(adapter.up(adapter.ln(x))))
    assert torch.allclose(adapter.mix(x, r), x + r * ffn, atol=1e-6)  # r A(x) + (1-r) x = x + r FFN(LN(x))
    assert sum(p.numel() for p in SurgeryAdapter(512, 2048).parameters()) == 2_100_736


def test_working_precision_keeps_shift_and_ratio_in_fp32(tiny_clip):
    """Under bf16 autocast (the GPU's PREC auto): L_fs from fp32 prompts, the ratio not rounded to bf16."""
    model = build(tiny_clip)
    with torch.no_grad():
        s_t32, s_v32 = model.prompt_shifts()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s_t, s_v = model.prompt_shifts()
    assert torch.equal(s_t, s_t32) and torch.equal(s_v, s_v32)  # MaPLe's projected vision prompts in fp32
    adapter = model.visual_adapter
    x = torch.randn(3, adapter.up.in_features).bfloat16()
    r = torch.tensor(0.101864)  # bf16 would make it 0.101562
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = adapter.mix(x, r)
        full = adapter(x).float()
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, r * full + (1 - r) * x.float(), rtol=0, atol=1e-6)


def test_model_surgery_identity_at_zero_ratio(tiny_clip):
    model = build(tiny_clip, TEXT_RATIO=0.0, VISION_RATIO=0.0).eval()
    plain = build(tiny_clip, USE_SURGERY=False).eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(), plain.encode_text(), atol=1e-6)
        assert torch.allclose(model.encode_image(images()), plain.encode_image(images()), atol=1e-6)


def test_one_shot_ratio_update_by_hand_and_grows_with_shift(tiny_clip):
    model = build(tiny_clip, TEXT_RATIO=0.1, VISION_RATIO=0.01)
    learner = model.prompt_learner
    mean_t = torch.stack([frob_gram(p.detach()) for p in learner.compound_prompts_text]).mean()
    mean_v = torch.stack([frob_gram(lin(p).detach()) for lin, p in
                          zip(learner.compound_prompt_projections, learner.compound_prompts_text)]).mean()
    assert model.maybe_update_ratios(2, 10) is None  # fires only after epoch index 10 // 3 = 3
    assert model.maybe_update_ratios(3, 10) is not None
    assert float(model.text_ratio) == pytest.approx(0.1 + 0.02 * float(mean_t), rel=1e-5)
    assert float(model.vision_ratio) == pytest.approx(0.01 + 0.005 * float(mean_v), rel=1e-5)
    assert int(model.ratio_updated_epoch) == 3
    before = float(model.text_ratio)
    assert model.maybe_update_ratios(3, 10) is None and float(model.text_ratio) == before  # once only
    # larger prompts -> larger shift -> larger coefficient
    small, large = build(tiny_clip), build(tiny_clip)
    with torch.no_grad():
        for p in large.prompt_learner.compound_prompts_text:
            p.mul_(3)
    small.maybe_update_ratios(3, 10)
    large.maybe_update_ratios(3, 10)
    assert float(large.text_ratio) > float(small.text_ratio) and float(large.vision_ratio) > float(small.vision_ratio)
    # E = 2 (cross-dataset config): after epoch index 0
    assert build(tiny_clip).maybe_update_ratios(0, 2) is not None


def test_ratio_schedules_per_epoch_and_fixed(tiny_clip):
    model = build(tiny_clip, RATIO_SCHEDULE="per_epoch")
    values = []
    for epoch in range(3):
        assert model.maybe_update_ratios(epoch, 3) is not None
        values.append(float(model.text_ratio))
    assert values[0] < values[1] < values[2]
    assert model.maybe_update_ratios(2, 3) is None  # an epoch is never applied twice (resume)
    fixed = build(tiny_clip, RATIO_SCHEDULE="fixed", TEXT_RATIO=0.2)
    assert all(fixed.maybe_update_ratios(e, 10) is None for e in range(10))
    assert float(fixed.text_ratio) == pytest.approx(0.2)
    # feature mode: the update uses the epoch's mean measured shift
    feat = build(tiny_clip, SHIFT="feature", TEXT_RATIO=0.1, VISION_RATIO=0.1)
    feat.reset_epoch_stats()
    out = feat(images())
    feat.loss(out, torch.tensor([0, 1]))
    s_t, s_v = out.extras["shift_text"].detach().mean(), out.extras["shift_vision"].detach().mean()
    feat.maybe_update_ratios(3, 10)
    assert float(feat.text_ratio) == pytest.approx(0.1 + 0.02 * float(s_t), rel=1e-4)
    assert float(feat.vision_ratio) == pytest.approx(0.1 + 0.005 * float(s_v), rel=1e-4)


# ------------------------------------------------------------------ checkpoints, gradients, sizes

@pytest.mark.parametrize("shift", ["prompt", "feature"])
def test_resume_keeps_reference_norms_and_ratios(tiny_clip, shift):
    extra = {"FEATURE_NORM": "first_step"} if shift == "feature" else {}
    model = build(tiny_clip, seed=0, SHIFT=shift, **extra)
    label = torch.tensor([0, 1])
    loss, _ = model.loss(model(images()), label)
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss.backward()
    optim.step()
    model.maybe_update_ratios(3, 10)
    state = model.checkpoint_state()
    for key in ("fs_ref_text", "fs_ref_vision", "fs_ref_steps", "text_ratio", "vision_ratio", "ratio_updated_epoch"):
        assert key in state
    assert not any(k.startswith("clip.") for k in state)
    torch.manual_seed(123)
    _, summary = model.loss(model(images(seed=5)), label)  # noqa
    resumed = build(tiny_clip, seed=7, SHIFT=shift, **extra)
    resumed.load_checkpoint_state(state, "test")
    for key, value in state.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    torch.manual_seed(123)
    _, summary2 = resumed.loss(resumed(images(seed=5)), label)  # must not re-capture the references
    assert summary2["loss_fs"] == pytest.approx(summary["loss_fs"], rel=1e-5)
    assert summary["loss_fs"] > 0
    assert torch.equal(resumed.fs_ref_text, state["fs_ref_text"])
    assert resumed.maybe_update_ratios(3, 10) is None  # the one-shot update already happened


@pytest.mark.parametrize("shift", ["prompt", "feature"])
def test_gradients_reach_exactly_the_learnable_parameters(tiny_clip, shift):
    model = build(tiny_clip, SHIFT=shift)
    model.loss(model(images()), torch.tensor([0, 2]))[0].backward()
    learnable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learnable == with_grad
    assert all(n.startswith(("prompt_learner.", "text_adapter.", "visual_adapter.")) for n in learnable)
    assert any(n.startswith("prompt_learner.compound_prompt_projections.") for n in learnable)
    assert any(n.startswith("text_adapter.") for n in learnable) and any(n.startswith("visual_adapter.") for n in learnable)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("clip."))
    names = {n for n, _ in model.named_parameters()}
    assert "text_ratio" not in names and "vision_ratio" not in names  # buffers: never trained


def test_promptsrc_variant_reuses_promptsrc_losses(tiny_clip):
    model = build(tiny_clip, base="promptsrc")
    out = model(images())
    loss, summary = model.loss(out, torch.tensor([0, 1]))
    assert {"loss_ce", "loss_text", "loss_image", "loss_kl", "loss_fs"} <= set(summary)
    assert len(model.fs_layers) == 8 and model.prompt_learner.vision_prompts[1].shape[0] == 4
    loss.backward()
    assert model.prompt_learner.text_prompts[0].grad is not None and model.visual_adapter.up.weight.grad is not None


def test_ivlp_analysis_variant_config_and_loss(tiny_clip):
    """BASE ivlp (paper Fig. 4, "IVLP + L_fs"): L_fs over IVLP's prompt parameters, no surgery, only prompts learn."""
    from restore.engine.config import merge_file
    from trainers.restore_trainer import RestoreIVLPModel

    cfg = get_cfg_default()
    extend_cfg(cfg)
    merge_file(cfg, os.path.join(ROOT, "configs/trainers/RESTORE/vit_b16_c2_ep10_batch4_2+2ctx_ivlp.yaml"))
    n = cfg.TRAINER.RESTORE
    assert (n.BASE, n.USE_SURGERY, n.FS_WEIGHT, cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.LR) == ("ivlp", False, 1.0, 10, 0.0035)
    assert (n.IVLP.N_CTX_TEXT, n.IVLP.N_CTX_VISION, n.IVLP.PROMPT_DEPTH_TEXT, n.IVLP.PROMPT_DEPTH_VISION) == (2, 2, 12, 12)

    depth = tiny_clip.visual.transformer.layers
    ivlp = node().IVLP.clone()
    ivlp.PROMPT_DEPTH_TEXT = ivlp.PROMPT_DEPTH_VISION = depth
    torch.manual_seed(0)
    model = RestoreIVLPModel(copy.deepcopy(tiny_clip), CLASSES, node(BASE="ivlp", USE_SURGERY=False, IVLP=ivlp))
    model.freeze()
    model.train()
    learner = model.prompt_learner
    assert model.fs_layers == list(range(1, depth)) and not hasattr(model, "text_adapter")
    out = model(images())
    loss, summary = model.loss(out, torch.tensor([0, 1]))
    assert summary["loss_fs"] == 0.0  # references = this first step
    with torch.no_grad():
        learner.text_prompts[0].mul_(2.0)  # layer 1 text prompts doubled: Gram norm x4, vision unchanged
    fs, _, _ = model.fs_loss()
    assert float(fs.detach()) == pytest.approx((4.0 - 1.0) ** 2, rel=1e-5)
    loss, summary = model.loss(model(images()), torch.tensor([0, 1]))
    loss.backward()
    learnable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert learnable and all(name.startswith("prompt_learner.") for name in learnable)
    assert all(p.grad is not None for p in learner.text_prompts) and all(p.grad is not None for p in learner.vision_prompts)


def test_trainable_parameter_count_vit_b16():
    from restore.clip.model import CLIP, CLIPConfig

    vit_b16 = CLIPConfig(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                         context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                         transformer_layers=12)
    with torch.device("meta"):
        clip = CLIP(vit_b16)
        model = RestoreMaPLeModel(clip, CLASSES, node())
    model.freeze()
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == restore_num_params() == 7_756_544
    assert restore_num_params(surgery=False) == 3_555_072


def test_train_py_applies_per_dataset_settings_before_user_opts():
    """A direct train.py run gets the official run list's DTD values; explicit opts still win."""
    from train import build_parser, setup_cfg

    def node_for(*opts):
        args = build_parser().parse_args([
            "--trainer", "RESTORE", "--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"),
            "--config-file", os.path.join(ROOT, "configs/trainers/RESTORE/vit_b16_c2_ep10_batch4_2ctx.yaml"), *opts])
        return setup_cfg(args).TRAINER.RESTORE

    n = node_for()
    assert (n.FS_WEIGHT, n.TEXT_RATIO, n.VISION_RATIO) == (0.5, 0.1, 0.15)
    assert node_for("TRAINER.RESTORE.FS_WEIGHT", "1.0").FS_WEIGHT == 1.0


def test_dataset_overrides_are_typed_values():
    from restore.methods import dataset_overrides, get_method

    spec = get_method("restore")
    assert dataset_overrides(spec, "dtd") == {"TRAINER.RESTORE.VISION_RATIO": 0.15, "TRAINER.RESTORE.TEXT_RATIO": 0.1,
                                              "TRAINER.RESTORE.FS_WEIGHT": 0.5}
    assert dataset_overrides(spec, "OxfordPets")["TRAINER.RESTORE.VISION_RATIO"] == 0.01
    assert dataset_overrides(spec, "dtd", "cross_dataset") == {}
    assert dataset_overrides(spec, "imagenet", "cross_dataset")["TRAINER.RESTORE.TEXT_RATIO"] == 0.05
    assert dataset_overrides(spec, "mnist") == {}


def test_variant_yaml_pins_a_value_against_the_dataset_overrides():
    """The IVLP analysis YAML pins FS_WEIGHT (1.0, the official analysis) on DTD, whose override is 0.5; the
    ratios it does not pin still come from the overrides, and the command line still wins."""
    from train import build_parser, setup_cfg

    def node_for(*opts):
        args = build_parser().parse_args([
            "--trainer", "RESTORE", "--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"),
            "--config-file", os.path.join(ROOT, "configs/trainers/RESTORE/vit_b16_c2_ep10_batch4_2+2ctx_ivlp.yaml"),
            *opts])
        return setup_cfg(args).TRAINER.RESTORE

    n = node_for()
    assert (n.FS_WEIGHT, n.VISION_RATIO) == (1.0, 0.15)
    assert node_for("TRAINER.RESTORE.FS_WEIGHT", "0.25").FS_WEIGHT == 0.25


# ------------------------------------------------------------------ whole runs and the analysis command



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """RESTORE (proxy shift) and RESTORE (paper shift): 2 epochs on base classes, then eval on new classes."""
    from restore.datasets.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("restore_runs")
    make_synthetic("dtd", str(base / "data"), num_classes=4, images_per_class=6)
    out = {}
    for name, extra in (("prompt", []), ("feature", ["TRAINER.RESTORE.SHIFT", "feature"])):
        train_dir, eval_dir = base / f"{name}_base", base / f"{name}_new"

        def args(out_dir, split, *flags):
            return ["--root", str(base / "data"), "--seed", "1", "--trainer", "RESTORE",
                    "--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"),
                    "--config-file", os.path.join(ROOT, "configs/trainers/RESTORE/vit_b16_c2_ep10_batch4_2ctx.yaml"),
                    "--output-dir", str(out_dir), *flags,
                    "MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "2",
                    "DATALOADER.NUM_WORKERS", "0", "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", split,
                    "DATASET.CACHE_DIR", str(base / "cache"), *extra]

        assert run_train_py(args(train_dir, "base")) == 0
        assert run_train_py(args(eval_dir, "new", "--eval-only", "--model-dir", str(train_dir), "--load-epoch", "2")) == 0
        out[name] = (train_dir, eval_dir, (train_dir / "log.txt").read_text())
    return base, out


def test_end_to_end_base_then_new(runs):
    base, out = runs
    for name, (train_dir, eval_dir, log) in out.items():
        assert "RESTORE guided update after epoch 1" in log, name
        train_res = json.loads((train_dir / "results.json").read_text())
        eval_res = json.loads((eval_dir / "results.json").read_text())
        assert train_res["trainer"] == "RESTORE" and train_res["split"] == "base" and eval_res["split"] == "new"
        assert train_res["restore"]["shift"] == name and train_res["restore"]["ratio_updated_epoch"] == 0
        # the evaluation on new classes uses the checkpoint's (updated) ratios, not the config's 0.1 / 0.15
        assert eval_res["restore"]["text_ratio"] == pytest.approx(train_res["restore"]["text_ratio"])
        assert eval_res["restore"]["text_ratio"] > 0.1
        ckpt = torch.load(train_dir / "MultiModalPromptLearner" / "model.pth.tar-2", weights_only=True)
        # prompt mode: the first-step references are in the checkpoint; feature mode (FEATURE_NORM none) needs none
        assert int(ckpt["state_dict"]["fs_ref_steps"]) == (1 if name == "prompt" else 0)
        assert (float(ckpt["state_dict"]["fs_ref_text"].min()) > 0) == (name == "prompt")
        assert 0 <= eval_res["accuracy"] <= 100


def test_analysis_command_writes_csv_and_png(runs, tmp_path, capsys):
    from restore.analysis import feature_shift

    base, out = runs
    dirs = [str(out["prompt"][0]), str(out["feature"][0])]
    assert feature_shift.main([*dirs, "--split", "new", "--max-images", "4", "--labels", "RESTORE-proxy",
                               "RESTORE-feature", "--out", str(tmp_path / "fs")]) == 0
    assert "Wrote" in capsys.readouterr().out
    with open(tmp_path / "fs" / "feature_shift.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 12 and {r["run"] for r in rows} == {"RESTORE-proxy", "RESTORE-feature"}
    assert all(float(r["shift_text"]) > 0 and float(r["shift_vision"]) > 0 for r in rows)
    assert {r["split"] for r in rows} == {"new"} and {r["num_classes"] for r in rows} == {"2"}
    for r in rows:
        assert float(r["discrepancy"]) == pytest.approx(abs(float(r["shift_text"]) - float(r["shift_vision"])), abs=1e-5)
    assert (tmp_path / "fs" / "feature_shift.png").stat().st_size > 1000


def test_official_quirk_switches(tmp_path):
    """RATIO_UPDATE_AFTER_EVAL: with per-epoch validation (best_val) the official code never updates the
    ratios; RESUME_RECAPTURE_REFS: a resumed run re-captures the shift references from its prompts."""
    from restore.datasets.synthetic import make_synthetic
    from restore.parity import RunKilled, killed_after_epoch

    make_synthetic("dtd", str(tmp_path / "data"), num_classes=4, images_per_class=6)

    def args(out_dir, *extra):
        return ["--root", str(tmp_path / "data"), "--seed", "1", "--trainer", "RESTORE",
                "--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"),
                "--config-file", os.path.join(ROOT, "configs/trainers/RESTORE/vit_b16_c2_ep10_batch4_2ctx.yaml"),
                "--output-dir", str(out_dir), "MODEL.BACKBONE.NAME", "tiny",
                "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "2", "DATALOADER.NUM_WORKERS", "0",
                "DATASET.NUM_SHOTS", "2", "DATASET.CACHE_DIR", str(tmp_path / "cache"), *extra]

    best = tmp_path / "best"
    assert run_train_py(args(best, "TEST.FINAL_MODEL", "best_val", "TRAINER.RESTORE.RATIO_UPDATE_AFTER_EVAL", "True")) == 0
    log = (best / "log.txt").read_text()
    assert "surgery ratios not updated" in log and "guided update" not in log
    assert json.loads((best / "results.json").read_text())["restore"]["ratio_updated_epoch"] == -1

    resumed = tmp_path / "resumed"
    with pytest.raises(RunKilled), killed_after_epoch(1):
        run_train_py(args(resumed))
    first = torch.load(resumed / "MultiModalPromptLearner" / "model.pth.tar-1", weights_only=True)["state_dict"]
    assert run_train_py(args(resumed, "TRAINER.RESTORE.RESUME_RECAPTURE_REFS", "True")) == 0
    assert "re-captures the feature-shift references" in (resumed / "log.txt").read_text()
    final = torch.load(resumed / "MultiModalPromptLearner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    assert int(final["fs_ref_steps"]) == 1
    # re-captured from the prompts trained in epoch 1, so not the first run's references
    assert not torch.allclose(final["fs_ref_text"], first["fs_ref_text"])
