"""MMRL (trainers/mmrl.py): parameter counts, token insertion, decoupled rule, loss, gradients, end to end."""

from __future__ import annotations

import json
import math
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from restore.clip.model import CLIP, CLIPConfig, causal_mask
from trainers.mmrl import MMRLModel, mix_logits, mmrl_loss, rep_layer_span, resolve_inference

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# ViT-B/16 widths (text 512, vision 768, embed 512, 12 + 12 layers); random weights.
VIT_B16 = CLIPConfig(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12)



@pytest.fixture(scope="module")
def vit_b16_clip():
    torch.manual_seed(0)
    return CLIP(VIT_B16).eval()


def _tiny_model(tiny_clip, classnames=("cat", "big_red_bird", "dog"), template="a photo of a {}.", **kwargs):
    torch.manual_seed(1)
    model = MMRLModel(tiny_clip, list(classnames), template, **kwargs)
    model.freeze()
    return model


def _learnable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("rep_dim, expected, paper", [(512, 4_992_256, "4.992M"), (32, 689_056, "0.689M"),
                                                      (2048, 18_762_496, None)])
def test_learnable_parameters_vit_b16_match_paper(vit_b16_clip, rep_dim, expected, paper):
    """Paper Tab. 6 counts every trainable tensor of the official model on ViT-B/16 (K = 5, 7 rep layers):
    R (K x d_r) + 7 vision maps Linear(d_r, 768) + 7 text maps Linear(d_r, 512) (with biases) + the
    representation projection P_v^r (768 x 512). MMRL (d_r 512) -> 4,992,256 = "4.992M", MMRL*
    (d_r 32) -> 689,056 = "0.689M"; EuroSAT's d_r 2048 -> 18,762,496. Counted on the real module.
    """
    model = MMRLModel(vit_b16_clip, ["cat", "dog"], "a photo of a {}.", rep_dim=rep_dim)
    model.freeze()
    count = _learnable(model)
    print(f"MMRL learnable parameters on ViT-B/16 with d_r={rep_dim}: {count:,}")
    assert count == expected
    if paper is not None:
        assert f"{count / 1e6:.3f}M" == paper
    assert all(name.startswith(("representation_learner.", "proj_rep"))
               for name, p in model.named_parameters() if p.requires_grad)


def test_initialisation_follows_reference(vit_b16_clip):
    torch.manual_seed(0)
    model = MMRLModel(vit_b16_clip, ["cat"], "a photo of a {}.")
    learner = model.representation_learner
    assert learner.compound_rep_tokens.shape == (5, 512)
    assert abs(learner.compound_rep_tokens.std().item() - 0.02) < 0.004
    assert abs(model.proj_rep.std().item() - 768 ** -0.5) < 0.002
    assert not torch.equal(model.proj_rep, vit_b16_clip.visual.proj)
    # per-layer maps start identical (deep copies) but are distinct parameters
    maps = learner.compound_rep_tokens_r2vproj
    assert len(maps) == 7 and len(learner.compound_rep_tokens_r2tproj) == 7
    assert all(torch.equal(maps[0].weight, m.weight) and torch.equal(maps[0].bias, m.bias) for m in maps)
    assert maps[0].weight is not maps[1].weight


# --------------------------------------------------------------------------- insertion / mask / EOT
def _manual_text(model, clip, rep_layers):
    """Reference text forward over the full 77 tokens, written out block by block."""
    first = rep_layers[0] - 1
    tokens = model.representation_learner.text_tokens()
    ids = model.token_ids
    k = tokens[0].shape[0]
    x = clip.token_embedding(ids) + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if first <= i < first + len(tokens):  # insert, then replace; afterwards they propagate
            rep = tokens[i - first].unsqueeze(0).expand(x.shape[0], -1, -1)
            rest = x[:, 1:] if i == first else x[:, 1 + k:]
            x = torch.cat([x[:, :1], rep, rest], dim=1)
        x = block(x, causal_mask(x.shape[1]))
    x = clip.ln_final(x)
    eot = ids.argmax(dim=-1) + k
    return x[torch.arange(x.shape[0]), eot] @ clip.text_projection


def _manual_image(model, clip, image, rep_layers):
    first = rep_layers[0] - 1
    tokens = model.representation_learner.vision_tokens()
    k = tokens[0].shape[0]
    visual = clip.visual
    x = visual.ln_pre(visual.embed(image))
    for i, block in enumerate(visual.transformer.resblocks):
        if first <= i < first + len(tokens):  # insert, then replace; afterwards they propagate
            rep = tokens[i - first].unsqueeze(0).expand(x.shape[0], -1, -1)
            rest = x[:, 1:] if i == first else x[:, 1 + k:]
            x = torch.cat([x[:, :1], rep, rest], dim=1)
        x = block(x)
    x = visual.ln_post(x)
    return x[:, 0] @ visual.proj, x[:, 1:1 + k].mean(dim=1) @ model.proj_rep


@pytest.mark.parametrize("rep_layers, k", [((6, 7, 8, 9, 10, 11, 12), 5), ((3, 4), 2)])
def test_token_insertion_mask_and_eot_shift(tiny_clip, rep_layers, k):
    # "{} texture." gives prompts of different lengths, hence different EOT positions
    model = _tiny_model(tiny_clip, ("cat", "big_red_bird"), "{} texture.", n_rep_tokens=k, rep_layers=rep_layers)
    first = rep_layers[0] - 1
    eot = model.token_ids.argmax(dim=-1)
    assert eot[0] != eot[1]
    text_tokens = model.representation_learner.text_tokens()
    vision_tokens = model.representation_learner.vision_tokens()
    seen = {"text": [], "vision": []}

    def observer(tower, tokens):
        def fn(layer, block, x_in, x_out, prompt_mask, attn_mask):
            seen[tower].append((layer, x_in.shape[1], prompt_mask.nonzero().flatten().tolist(),
                                None if attn_mask is None else attn_mask.shape))
            if first <= layer < first + len(tokens):  # this layer's tokens sit right after BOT / CLS
                expected = tokens[layer - first].unsqueeze(0).expand(x_in.shape[0], -1, -1)
                torch.testing.assert_close(x_in[:, 1:1 + k], expected)
        return fn

    with torch.no_grad():
        text_out = model.encode_text_output(observer=observer("text", text_tokens))
        image = torch.randn(2, 3, 224, 224)
        image_out = model.encode_image_output(image, observer=observer("vision", vision_tokens))
    length = int(eot.max()) + 1  # the text tower runs up to the longest EOT
    n_patches = 1 + (224 // 32) ** 2
    for layer, size, positions, mask_shape in seen["text"]:
        grown = layer >= first
        assert size == length + (k if grown else 0)
        assert positions == (list(range(1, 1 + k)) if grown else [])
        assert mask_shape == (size, size)  # causal mask rebuilt for the grown sequence
    for layer, size, positions, mask_shape in seen["vision"]:
        grown = layer >= first
        assert size == n_patches + (k if grown else 0)
        assert positions == (list(range(1, 1 + k)) if grown else [])
        assert mask_shape is None
    assert len(seen["text"]) == len(seen["vision"]) == 12
    assert text_out.pooled_index.tolist() == (eot + k).tolist()
    assert text_out.slots["rep_tokens"] == slice(1, 1 + k) == image_out.slots["rep_tokens"]
    with torch.no_grad():
        torch.testing.assert_close(text_out.features, _manual_text(model, tiny_clip, rep_layers), atol=1e-5, rtol=1e-4)
        f_c, f_r = model.image_features_pair(image)
        m_c, m_r = _manual_image(model, tiny_clip, image, rep_layers)
    torch.testing.assert_close(f_c, m_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(f_r, m_r, atol=1e-5, rtol=1e-4)


def test_rep_layers_validation():
    assert rep_layer_span([6, 7, 8, 9, 10, 11, 12], 12) == (5, 7)
    for bad in ([], [6, 8], [0, 1], [12, 13]):
        with pytest.raises(ValueError):
            rep_layer_span(bad, 12)


# --------------------------------------------------------------------------- decoupled rule
DECOUPLED_TABLE = [
    # protocol, SUBSAMPLE_CLASSES, INFERENCE, evaluating the training dataset?, logits used
    ("base2new", "base", "auto", True, "mixed"),
    ("base2new", "new", "auto", True, "class"),
    ("base2new", "all", "auto", True, "class"),
    ("few_shot", "all", "auto", True, "mixed"),
    ("few_shot", "all", "auto", False, "mixed"),
    ("cross_dataset", "all", "auto", True, "mixed"),    # ImageNet (source), test after training
    ("cross_dataset", "all", "auto", False, "class"),   # the 10 target datasets
    ("domain_generalization", "all", "auto", True, "mixed"),
    ("domain_generalization", "all", "auto", False, "class"),  # ImageNet-V2 / Sketch / A / R
    ("base2new", "base", "class", True, "class"),       # explicit overrides win
    ("base2new", "new", "mixed", True, "mixed"),
    ("cross_dataset", "all", "mixed", False, "mixed"),
]


@pytest.mark.parametrize("protocol, subsample, inference, source, expected", DECOUPLED_TABLE)
def test_decoupled_inference_rule(protocol, subsample, inference, source, expected):
    assert resolve_inference(protocol, subsample, inference, source) == expected


def test_decoupled_rule_rejects_unknown_values():
    with pytest.raises(ValueError):
        resolve_inference("zero_shot", "all")
    with pytest.raises(ValueError):
        resolve_inference("base2new", "base", "fused")


def test_eval_logits_follow_inference_mode(tiny_clip):
    model = _tiny_model(tiny_clip).eval()
    image = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        model.inference = "class"
        out = model(image)
        z_c, z_r = out.extras["logits_class"], out.extras["logits_rep"]
        torch.testing.assert_close(out.logits, z_c)
        model.inference = "mixed"
        torch.testing.assert_close(model(image).logits, 0.7 * z_c + 0.3 * z_r)
        model.mix = "probs"
        mixed = model(image).logits
    torch.testing.assert_close(mixed.softmax(-1), 0.7 * z_c.softmax(-1) + 0.3 * z_r.softmax(-1))
    # the two mixings can disagree on the argmax: hand-made case
    z_c, z_r = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 100.0, 0.0]])
    assert mix_logits(z_c, z_r, 0.7, "logits").argmax().item() == 1
    assert mix_logits(z_c, z_r, 0.7, "probs").argmax().item() == 0


# --------------------------------------------------------------------------- loss
def test_loss_matches_hand_computation():
    z_c = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    z_r = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 3.0]])
    label = torch.tensor([0, 1])
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    f0 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])         # cos 0.6 and 1.0
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    w0 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [4.0, 3.0]])  # cos 1, 1/sqrt2, 24/25
    alpha, lam = 0.7, 6.0
    ce_c = ((-2 + math.log(math.e ** 2 + 1 + math.e ** -1)) + (-1 + math.log(2 + math.e))) / 2
    ce_r = (math.log(2 + math.e) + (-1 + math.log(2 * math.e + math.e ** 3))) / 2
    cos_v = 1 - (0.6 + 1.0) / 2
    cos_t = 1 - (1 + 2 ** -0.5 + 24 / 25) / 3
    expected = alpha * ce_c + (1 - alpha) * ce_r + lam * (cos_v + cos_t)
    loss, parts = mmrl_loss(z_c, z_r, label, f, f0, w, w0, alpha, lam)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert parts["loss_ce_class"].item() == pytest.approx(ce_c, abs=1e-6)
    assert parts["loss_ce_rep"].item() == pytest.approx(ce_r, abs=1e-6)
    assert parts["loss_cos_v"].item() == pytest.approx(cos_v, abs=1e-6)
    assert parts["loss_cos_t"].item() == pytest.approx(cos_t, abs=1e-6)
    no_reg, parts = mmrl_loss(z_c, z_r, label, f, None, w, None, alpha, 0.0)
    assert no_reg.item() == pytest.approx(alpha * ce_c + (1 - alpha) * ce_r, abs=1e-6)


def test_teachers_are_frozen_clip(tiny_clip):
    from restore.clip.tokenizer import tokenize

    model = _tiny_model(tiny_clip, ("cat", "big_red_bird"), "a photo of a {}.")
    with torch.no_grad():
        ids = tokenize(["a photo of a cat.", "a photo of a big red bird."])
        expected_t = F.normalize(tiny_clip.encode_text(ids), dim=-1)
        image = torch.randn(2, 3, 224, 224)
        expected_v = F.normalize(tiny_clip.encode_image(image), dim=-1)
    torch.testing.assert_close(model.teacher_text_features, expected_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.teacher_image_features(image), expected_v, atol=1e-5, rtol=1e-4)
    assert "teacher_text_features" not in model.state_dict()  # class dependent, never saved


def test_training_forward_takes_the_image_teacher_from_the_same_pass(tiny_clip):
    """The frozen teacher's image features come out of the student's pass: equal to a separate teacher
    run, and the blocks before the rep tokens run once (depth + depth - J block calls, not 2 x depth)."""
    model = _tiny_model(tiny_clip).train()
    blocks = tiny_clip.visual.transformer.resblocks
    calls = []
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in blocks]
    image = torch.randn(2, 3, 224, 224)
    try:
        out = model(image)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(out.extras["teacher_image_features"], model.teacher_image_features(image))
    assert len(calls) == 2 * len(blocks) - model.first_layer and model.first_layer > 0
    model.reg_weight = 0.0
    assert "teacher_image_features" not in model(image).extras


# --------------------------------------------------------------------------- gradients
def test_gradients_reach_exactly_the_learnable_parameters(tiny_clip):
    model = _tiny_model(tiny_clip, reg_weight=2.0).train()
    out = model(torch.randn(2, 3, 224, 224))
    loss, summary = model.loss(out, torch.tensor([0, 2]))
    assert set(summary) == {"loss", "loss_ce_class", "loss_ce_rep", "loss_cos_v", "loss_cos_t"}
    loss.backward()
    learnable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == learnable
    assert len(learnable) == 1 + 2 * 7 * 2 + 1  # R, 7 x (W, b) per tower, proj_rep
    assert all(p.grad is None for p in tiny_clip.parameters())
    assert set(model.checkpoint_state()) == learnable
    model.zero_grad(set_to_none=True)


def test_checkpoint_loads_for_other_classes(tiny_clip):
    base = _tiny_model(tiny_clip, ("cat", "dog"))
    new = _tiny_model(tiny_clip, ("bird", "fish", "horse"))
    state = base.checkpoint_state()
    new.load_checkpoint_state(state, "ckpt")
    torch.testing.assert_close(new.proj_rep, base.proj_rep)
    assert new.encode_text().shape[0] == 3


# --------------------------------------------------------------------------- per-dataset yaml
def test_dataset_overrides_from_yaml():
    from restore.methods import dataset_overrides, get_method

    spec = get_method("mmrl")

    def mmrl_dataset_opts(name, protocol="base2new"):
        return dataset_overrides(spec, name, protocol)

    assert mmrl_dataset_opts("dtd") == {"TRAINER.MMRL.REG_WEIGHT": 6.0}
    assert mmrl_dataset_opts("DescribableTextures") == {"TRAINER.MMRL.REG_WEIGHT": 6.0}
    assert mmrl_dataset_opts("EuroSAT") == {"TRAINER.MMRL.REG_WEIGHT": 0.01, "TRAINER.MMRL.REP_DIM": 2048}
    assert mmrl_dataset_opts("eurosat", "few_shot") == mmrl_dataset_opts("eurosat")
    assert mmrl_dataset_opts("imagenet", protocol="cross_dataset") == {}
    assert mmrl_dataset_opts("imagenetv2") == {}
    expected = {"stanford_cars": 7.0, "fgvc_aircraft": 6.0, "sun397": 6.0, "dtd": 6.0, "food101": 5.0,
                "oxford_flowers": 4.0, "ucf101": 3.0, "imagenet": 0.5, "caltech101": 0.5, "oxford_pets": 0.2,
                "eurosat": 0.01}
    for name, lam in expected.items():
        assert mmrl_dataset_opts(name)["TRAINER.MMRL.REG_WEIGHT"] == lam


# --------------------------------------------------------------------------- MMRL* (d_r 32) under the protocols
def _protocol_cfg(tmp_path, dataset, cfg="", opts=()):
    """The config train.py builds for a protocol base2new training step (config file + opts)."""
    from restore import protocols as P
    from train import build_parser, setup_cfg

    ctx = P.Context(data=str(tmp_path), output=str(tmp_path / "out"), cfg=cfg, opts=list(opts))
    step = P.base2new_train(ctx, "mmrl", dataset, 1)
    args = build_parser().parse_args(step.train_argv(resolve_epoch=False))
    return setup_cfg(args), args.config_file, step.output_dir


@pytest.mark.parametrize("dataset, rep_dim, reg_weight", [("eurosat", 2048, 0.01), ("dtd", 32, 6.0),
                                                           ("caltech101", 32, 0.5)])
def test_mmrl_star_keeps_eurosat_rep_dim_2048(tmp_path, dataset, rep_dim, reg_weight):
    """Paper: "in the d_r ablation experiments we fix d_r for EuroSAT to 2048 while adjusting d_r on
    the other datasets"; MMRL* (HM 80.84, Tab. 6) is its d_r = 32 row. So CFG=vit_b16_base2new_light
    gives d_r 32 everywhere except EuroSAT (2048), with the per-dataset lambda as for MMRL."""
    cfg, config_file, _ = _protocol_cfg(tmp_path, dataset, cfg="vit_b16_base2new_light")
    assert osp.basename(config_file) == "vit_b16_base2new_light.yaml"
    assert cfg.TRAINER.MMRL.REP_DIM == rep_dim
    assert cfg.TRAINER.MMRL.REG_WEIGHT == pytest.approx(reg_weight)
    # MMRL (default config) and MMRL* pass the same per-dataset opts
    assert _protocol_cfg(tmp_path, dataset)[0].TRAINER.MMRL.REP_DIM == (2048 if dataset == "eurosat" else 512)
    # the user's own opts still win over the per-dataset ones
    mine = _protocol_cfg(tmp_path, dataset, cfg="vit_b16_base2new_light", opts=["TRAINER.MMRL.REP_DIM", "64"])[0]
    assert mine.TRAINER.MMRL.REP_DIM == 64


@pytest.mark.parametrize("dataset, reg_weight, rep_dim", [("eurosat", 0.01, 2048), ("dtd", 6.0, 512)])
def test_train_py_applies_published_per_dataset_values_before_user_opts(dataset, reg_weight, rep_dim, capsys):
    """A plain train.py run (no protocol runner) gets the official per-dataset lambda / d_r; explicit opts win."""
    from train import build_parser, setup_cfg

    def cfg_for(*opts):
        args = build_parser().parse_args([
            "--trainer", "MMRL", "--dataset-config-file", osp.join(ROOT, f"configs/datasets/{dataset}.yaml"),
            "--config-file", osp.join(ROOT, "configs/trainers/MMRL/vit_b16_base2new.yaml"), *opts])
        return setup_cfg(args).TRAINER.MMRL

    node = cfg_for()
    assert (node.REG_WEIGHT, node.REP_DIM) == (pytest.approx(reg_weight), rep_dim)
    assert capsys.readouterr().out.count("MMRL dataset overrides for") == 1  # one line (the launcher no longer repeats it)
    node = cfg_for("TRAINER.MMRL.REG_WEIGHT", "3.0", "TRAINER.MMRL.REP_DIM", "64")
    assert (node.REG_WEIGHT, node.REP_DIM) == (3.0, 64)


def test_light_config_has_an_imagenet_variant_picked_by_resolve_config():
    """CFG=vit_b16_base2new_light must not train ImageNet at batch 4 / 10 epochs: the paper (and
    MMRL's own ImageNet config) uses batch 32 / 5 epochs there."""
    import yaml

    from restore import protocols as P

    spec = P.get_spec("mmrl")
    path, name = P.resolve_config(spec, "base2new", "imagenet", cfg="vit_b16_base2new_light")
    assert osp.basename(path) == "vit_b16_base2new_light_imagenet.yaml" and osp.isfile(path)
    assert name == "vit_b16_base2new_light"  # one run-folder name for the whole grid
    path_dtd, name_dtd = P.resolve_config(spec, "base2new", "dtd", cfg="vit_b16_base2new_light")
    assert osp.basename(path_dtd) == "vit_b16_base2new_light.yaml" and name_dtd == name
    # naming the MMRL default config explicitly keeps ImageNet's own file as well
    assert osp.basename(P.resolve_config(spec, "base2new", "imagenet", cfg="vit_b16_base2new")[0]) == \
        "vit_b16_base2new_imagenet.yaml"
    assert osp.basename(P.resolve_config(spec, "fewshot", "imagenet", cfg="vit_b16_few_shot")[0]) == \
        "vit_b16_few_shot_imagenet.yaml"
    # a path is used as given
    assert P.resolve_config(spec, "base2new", "imagenet", cfg=path_dtd)[0] == path_dtd

    def load(fname):
        with open(osp.join(ROOT, "configs", "trainers", "MMRL", fname)) as f:
            return yaml.safe_load(f)

    light_imagenet, imagenet = load("vit_b16_base2new_light_imagenet.yaml"), load("vit_b16_base2new_imagenet.yaml")
    assert light_imagenet["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"] == 32 and light_imagenet["OPTIM"]["MAX_EPOCH"] == 5
    assert light_imagenet["TRAINER"]["MMRL"]["REP_DIM"] == 32
    imagenet["TRAINER"]["MMRL"]["REP_DIM"] = 32
    assert light_imagenet == imagenet  # MMRL on ImageNet but d_r 32
    light, full = load("vit_b16_base2new_light.yaml"), load("vit_b16_base2new.yaml")
    full["TRAINER"]["MMRL"]["REP_DIM"] = 32
    assert light == full


def test_protocol_runs_mmrl_star_imagenet_at_batch_32_for_5_epochs(tmp_path):
    cfg, config_file, out = _protocol_cfg(tmp_path, "imagenet", cfg="vit_b16_base2new_light")
    assert osp.basename(config_file) == "vit_b16_base2new_light_imagenet.yaml"
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32 and cfg.OPTIM.MAX_EPOCH == 5
    assert cfg.TRAINER.MMRL.REP_DIM == 32 and cfg.TRAINER.MMRL.REG_WEIGHT == pytest.approx(0.5)
    assert out.endswith(osp.join("MMRL", "vit_b16_base2new_light", "seed1"))
    # the other datasets of the grid share that folder name, with MMRL*'s batch 4 / 10 epochs
    cfg_dtd, _, out_dtd = _protocol_cfg(tmp_path, "dtd", cfg="vit_b16_base2new_light")
    assert cfg_dtd.DATALOADER.TRAIN_X.BATCH_SIZE == 4 and cfg_dtd.OPTIM.MAX_EPOCH == 10
    assert out_dtd.endswith(osp.join("MMRL", "vit_b16_base2new_light", "seed1"))


# --------------------------------------------------------------------------- end to end
def _run(args_list):
    from train import build_parser, main

    return main(build_parser().parse_args(args_list))


def test_end_to_end_base_to_new_on_synthetic_dtd(tmp_path):
    synthetic = pytest.importorskip("restore.datasets.synthetic", reason="restore.datasets.synthetic not available")
    root = str(tmp_path / "data")
    synthetic.make_synthetic("dtd", root, num_classes=4, images_per_class=6)
    common = ["--root", root, "--trainer", "MMRL", "--seed", "1",
              "--dataset-config-file", osp.join(ROOT, "configs/datasets/dtd.yaml"),
              "--config-file", osp.join(ROOT, "configs/trainers/MMRL/vit_b16_base2new.yaml")]
    opts = ["MODEL.BACKBONE.NAME", "tiny", "DATASET.NUM_SHOTS", "2", "DATALOADER.NUM_WORKERS", "0",
            "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "2"]
    train_dir = str(tmp_path / "base")
    assert _run([*common, "--output-dir", train_dir, *opts, "DATASET.SUBSAMPLE_CLASSES", "base"]) == 0
    ckpt = osp.join(train_dir, "MultiModalRepresentationLearner", "model.pth.tar-1")
    assert osp.isfile(ckpt)
    with open(osp.join(train_dir, "results.json")) as f:
        base = json.load(f)
    assert base["split"] == "base" and base["mmrl_inference"] == "mixed" and base["num_classes"] == 2

    new_dir = str(tmp_path / "new")
    assert _run([*common, "--output-dir", new_dir, "--eval-only", "--model-dir", train_dir, "--load-epoch", "1",
                 *opts, "DATASET.SUBSAMPLE_CLASSES", "new"]) == 0
    with open(osp.join(new_dir, "results.json")) as f:
        new = json.load(f)
    assert new["split"] == "new" and new["mmrl_inference"] == "class" and new["epoch"] == 1
    assert 0.0 <= new["accuracy"] <= 100.0

    # cross-dataset rule: the same weights on their own dataset -> mixed, on another dataset -> class
    synthetic.make_synthetic("eurosat", root, num_classes=4, images_per_class=6)
    for dataset, expected in (("dtd", "mixed"), ("eurosat", "class")):
        out = str(tmp_path / f"xd_{dataset}")
        assert _run(["--eval-only", "--model-dir", train_dir, "--load-epoch", "1", "--root", root, "--trainer", "MMRL",
                     "--output-dir", out, "--dataset-config-file", osp.join(ROOT, f"configs/datasets/{dataset}.yaml"),
                     "--config-file", osp.join(ROOT, "configs/trainers/MMRL/vit_b16_cross_dataset.yaml"),
                     "MODEL.BACKBONE.NAME", "tiny", "DATALOADER.NUM_WORKERS", "0"]) == 0
        with open(osp.join(out, "results.json")) as f:
            record = json.load(f)
        assert record["protocol"] == "cross_dataset" and record["mmrl_inference"] == expected, dataset
