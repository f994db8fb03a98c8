"""Checkpoints written by the methods' official code load into our models (released weights).

Each official layout below is written out by hand from the official trainers (key names, which
block holds which deep prompt, the frozen CLIP and class buffers saved beside them, fp16 where the
official code keeps a tensor in fp16), independently of the renaming rules in the trainers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import dassl_checkpoint, run_train_py
from test_trainers import BASE_CLASSES, NEW_CLASSES, _images, build_model

from restore.engine.utils import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_WIDTH, VISION_WIDTH = 64, 128  # the tiny CLIP's towers


def _frozen_clip(num_classes: int, prompt_learner_buffers: bool = True) -> dict[str, torch.Tensor]:
    """What a whole-CustomCLIP official checkpoint holds besides the prompts (a sample of it)."""
    frozen = {"image_encoder.conv1.weight": torch.randn(VISION_WIDTH, 3, 32, 32).half(),
              "image_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * VISION_WIDTH, VISION_WIDTH),
              "text_encoder.ln_final.weight": torch.ones(TEXT_WIDTH), "logit_scale": torch.tensor(4.6052)}
    if prompt_learner_buffers:
        frozen["prompt_learner.token_prefix"] = torch.randn(num_classes, 1, TEXT_WIDTH).half()
        frozen["prompt_learner.token_suffix"] = torch.randn(num_classes, 74, TEXT_WIDTH).half()
    return frozen


def official_layout(name: str, ours: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """The state_dict the official code of ``name`` saves for the learned tensors ``ours``."""
    h = torch.Tensor.half
    if name in ("CoOp", "KgCoOp"):  # prompt learner registered alone, fp16
        out = {"ctx": h(ours["prompt_learner.ctx"]),
               "token_prefix": torch.randn(num_classes, 1, TEXT_WIDTH).half(),
               "token_suffix": torch.randn(num_classes, 72, TEXT_WIDTH).half()}
        if name == "KgCoOp":  # saved, frozen and unused by the official KgCoOp
            out.update({"bias_vectors": torch.randn(1, TEXT_WIDTH).half(),
                        "meta_net.linear1.weight": torch.randn(TEXT_WIDTH, TEXT_WIDTH).half(),
                        "meta_net.linear1.bias": torch.randn(TEXT_WIDTH).half()})
        return out
    if name == "CoCoOp":
        out = {"ctx": h(ours["prompt_learner.context.ctx"]),
               "token_prefix": torch.randn(num_classes, 1, TEXT_WIDTH).half(),
               "token_suffix": torch.randn(num_classes, 72, TEXT_WIDTH).half()}
        for part in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"):
            out[f"meta_net.{part}"] = h(ours[f"prompt_learner.meta_net.{part}"])
        return out
    if name == "MaPLe":
        out = {"prompt_learner.ctx": h(ours["prompt_learner.text_context.ctx"]),
               "prompt_learner.proj.weight": h(ours["prompt_learner.proj.weight"]),
               "prompt_learner.proj.bias": h(ours["prompt_learner.proj.bias"])}
        for k in range(8):  # PROMPT_DEPTH 9: compound prompts of layers 1..8, fp32
            out[f"prompt_learner.compound_prompts_text.{k}"] = ours[f"prompt_learner.compound_prompts_text.{k}"]
            for part in ("weight", "bias"):
                out[f"prompt_learner.compound_prompt_projections.{k}.{part}"] = \
                    ours[f"prompt_learner.compound_prompt_projections.{k}.{part}"]
        return {**out, **_frozen_clip(num_classes)}
    if name in ("IVLP", "PromptSRC", "VPT"):
        out = {"image_encoder.VPT": ours["prompt_learner.vision_prompts.0"]}  # layer 0, on the image encoder
        k = 1
        while f"prompt_learner.vision_prompts.{k}" in ours:  # layer k's prompt lives in block k
            out[f"image_encoder.transformer.resblocks.{k}.VPT_shallow"] = ours[f"prompt_learner.vision_prompts.{k}"]
            k += 1
        if name == "VPT":
            return {**out, **_frozen_clip(num_classes, prompt_learner_buffers=False)}
        out["prompt_learner.ctx"] = h(ours["prompt_learner.text_context.ctx"])
        k = 0
        while f"prompt_learner.text_prompts.{k}" in ours:  # text layer k + 1 in block k + 1
            out[f"text_encoder.transformer.resblocks.{k + 1}.VPT_shallow"] = ours[f"prompt_learner.text_prompts.{k}"]
            k += 1
        if name == "PromptSRC":  # the frozen zero-shot image encoder is saved a second time
            out["prompt_learner.ZS_image_encoder.conv1.weight"] = torch.randn(VISION_WIDTH, 3, 32, 32).half()
        return {**out, **_frozen_clip(num_classes)}
    if name == "MMRL":
        out = {"image_encoder.proj_rep": ours["proj_rep"],
               "prompt_embeddings": torch.randn(num_classes, 77, TEXT_WIDTH)}
        out.update({k: v for k, v in ours.items() if k.startswith("representation_learner.")})
        return {**out, **_frozen_clip(num_classes, prompt_learner_buffers=False)}
    raise KeyError(name)


OFFICIAL = ["CoOp", "CoCoOp", "KgCoOp", "MaPLe", "IVLP", "VPT", "PromptSRC", "MMRL"]


def _round_to_official_dtypes(model) -> None:
    """Give ``model`` exactly the values the (partly fp16) official file holds."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # away from the seeded init the fresh model shares
        for key, value in model.checkpoint_state().items():
            if not key.startswith("gpa."):
                model.get_parameter(key).copy_(value.half().float() if key.endswith(("ctx", "proj.weight", "proj.bias"))
                                               or "meta_net" in key else value)


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_checkpoint_loads_and_gives_the_same_logits(name, tiny_clip, capsys):
    images = _images(2)
    source = build_model(name, tiny_clip, BASE_CLASSES, seed=0)
    _round_to_official_dtypes(source)
    ours = {k: v for k, v in source.checkpoint_state().items() if not k.startswith("gpa.")}
    official = official_layout(name, ours, len(BASE_CLASSES))
    assert set(official) != set(ours)

    loaded = build_model(name, tiny_clip, BASE_CLASSES, seed=1)
    loaded.load_checkpoint_state(official, "official.pth")
    assert "official" in capsys.readouterr().out
    state = loaded.checkpoint_state()
    for key, value in ours.items():
        assert torch.equal(state[key], value), key
    if name == "PromptSRC":  # GPA's sums hold the aggregate, every epoch counted, as in our last checkpoint
        assert int(state["gpa.epochs"]) == loaded.gpa.max_epoch
        assert torch.equal(state["gpa.sum__prompt_learner__text_context__ctx"], ours["prompt_learner.text_context.ctx"])
    for model in (source, loaded):
        model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(images).logits, source(images).logits, atol=1e-5)

    # Class buffers are dropped: the same file evaluates on new classes.
    new = build_model(name, tiny_clip, NEW_CLASSES, seed=2)
    new.load_checkpoint_state(official, "official.pth")
    new.eval()
    with torch.no_grad():
        assert new(images).logits.shape == (2, len(NEW_CLASSES))


@pytest.mark.parametrize("name", ["MaPLe", "IVLP"])
def test_official_checkpoint_with_other_settings_is_a_clear_error(name, tiny_clip):
    source = build_model(name, tiny_clip, BASE_CLASSES)
    official = official_layout(name, source.checkpoint_state(), len(BASE_CLASSES))
    deepest = max(k for k in official if "compound_prompts_text" in k or "VPT_shallow" in k)
    del official[deepest]  # e.g. trained with a smaller PROMPT_DEPTH
    with pytest.raises(CheckpointError, match="official-code checkpoint written with other settings"):
        build_model(name, tiny_clip, BASE_CLASSES).load_checkpoint_state(official, "official.pth")
    with pytest.raises(CheckpointError, match="another trainer"):  # ours from another trainer: not taken as official
        build_model(name, tiny_clip, BASE_CLASSES).load_checkpoint_state({"prompt_learner.ctx": torch.zeros(4, 64)}, "x")


def test_released_maple_folder_evaluates_through_train_py_like_our_own_checkpoint(tmp_path, tiny_clip):
    """``--model-dir`` pointing at an official MaPLe output folder (a Dassl file holding pickled
    scheduler and optimizer objects, loaded without full unpickling) gives the same test accuracy
    as the same prompts saved by this library."""
    from restore.datasets.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic("dtd", str(data), num_classes=4, images_per_class=6)
    source = build_model("MaPLe", tiny_clip, BASE_CLASSES, N_CTX=2, PROMPT_DEPTH=9)
    _round_to_official_dtypes(source)
    ours = source.checkpoint_state()
    folders = {"official": dassl_checkpoint(official_layout("MaPLe", ours, 2), epoch=5),  # scheduler objects inside
               "ours": {"state_dict": ours, "epoch": 5, "trainer": "MaPLe", "backbone": "tiny"}}
    accuracies = {}
    for kind, checkpoint in folders.items():
        model_dir = tmp_path / kind / "MultiModalPromptLearner"
        model_dir.mkdir(parents=True)
        torch.save(checkpoint, model_dir / "model.pth.tar-5")
        out = tmp_path / f"eval_{kind}"
        args = ["--root", str(data), "--trainer", "MaPLe", "--seed", "1", "--eval-only",
                "--model-dir", str(tmp_path / kind), "--load-epoch", "5", "--output-dir", str(out),
                "--config-file", os.path.join(ROOT, "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"),
                "--dataset-config-file", os.path.join(ROOT, "configs/datasets/dtd.yaml"),
                "MODEL.BACKBONE.NAME", "tiny", "DATALOADER.NUM_WORKERS", "0", "USE_CUDA", "False",
                "DATASET.SUBSAMPLE_CLASSES", "new"]
        assert run_train_py(args) == 0
        accuracies[kind] = json.loads((out / "results.json").read_text())["accuracy"]
        if kind == "official":
            assert "a checkpoint of the official MaPLeModel code" in (out / "log.txt").read_text()
    assert accuracies["official"] == accuracies["ours"]
