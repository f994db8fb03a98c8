"""restore.clip: tokenizer, checkpoint loading (paths, TorchScript, SHA256, cache), open_clip conversion."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from restore.clip import (
    CLIP,
    OPENAI_MEAN,
    OPENAI_MODELS,
    TINY_CONFIG,
    ChecksumError,
    CLIPConfig,
    available_models,
    clear_cache,
    convert_open_clip,
    encode,
    load_clip,
    save_openai_state_dict,
    tokenize,
)
from restore.clip import loader as clip_loader
from restore.clip.loader import sha256_file

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a photo of a cat.", "a photo of a Sea-Lion, a type of animal!", "X X X X dog", "ünïcödé café 123"]
LONG_TEXT = " ".join(["photograph"] * 100)

# A small open_clip architecture (two heads of width 32 per tower, so heads != width // 64).
OC_TINY_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 224, 224, generator=g), tokenize(TEXTS[:2])


def _features(model: CLIP, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


def _oc_model(quick_gelu: bool = False, seed: int = 0, **vision_extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(OC_TINY_CFG))
    cfg["vision_cfg"].update(vision_extra)
    return open_clip.CLIP(**cfg, quick_gelu=quick_gelu).eval()


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenize_matches_open_clip_and_openai_layout():
    ours = tokenize(TEXTS)
    assert ours.dtype == torch.long and ours.shape == (len(TEXTS), 77)
    assert torch.equal(ours, open_clip.tokenize(TEXTS))
    first = ours[0].tolist()
    ids = encode(TEXTS[0])
    assert first[:len(ids) + 2] == [49406, *ids, 49407]
    assert all(t == 0 for t in first[len(ids) + 2:])
    assert tokenize("a photo of a cat.").shape == (1, 77)
    assert torch.equal(tokenize("a photo of a cat.", context_length=10)[0], ours[0, :10])


def test_tokenize_too_long_raises_unless_truncate():
    with pytest.raises(RuntimeError, match="too long for context length 77"):
        tokenize([TEXTS[0], LONG_TEXT])
    cut = tokenize([TEXTS[0], LONG_TEXT], truncate=True)
    assert cut[1, -1].item() == 49407 and cut[1, 0].item() == 49406
    assert torch.equal(cut, open_clip.tokenize([TEXTS[0], LONG_TEXT]))  # open_clip always truncates


def test_import_restore_clip_does_not_import_open_clip():
    """Neither importing restore.clip nor tokenizing imports the open_clip package (timm, huggingface_hub:
    seconds per process); the ids are still open_clip's."""
    code = ("import sys, restore.clip; assert 'open_clip' not in sys.modules, 'open_clip imported eagerly'\n"
            "from restore.clip.tokenizer import tokenize\n"
            f"ids = tokenize({TEXTS!r})\n"
            "assert 'open_clip' not in sys.modules and 'timm' not in sys.modules, 'tokenize imported open_clip'\n"
            "print(ids.tolist())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.tensor(json.loads(proc.stdout)), open_clip.tokenize(TEXTS))


# --- loading from files ----------------------------------------------------------------------


def test_plain_state_dict_roundtrip_by_path(tiny_clip, inputs, tmp_path):
    path = tmp_path / "tiny_openai_layout.pt"
    save_openai_state_dict(tiny_clip, path)
    keys = set(torch.load(path, weights_only=True))
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in keys and "text_projection" in keys
    loaded = load_clip(str(path))
    assert not loaded.random_weights and loaded.source == str(path)
    assert loaded.mean == OPENAI_MEAN and loaded.input_resolution == 224
    assert loaded.model.config == tiny_clip.config
    for a, b in zip(_features(loaded.model, *inputs), _features(tiny_clip, *inputs)):
        assert torch.equal(a, b)


def test_fp16_state_dict_loads_as_fp32(tiny_clip, inputs, tmp_path):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in tiny_clip.state_dict().items()}, path)
    loaded = load_clip(str(path))
    assert loaded.model.dtype == torch.float32
    img, _ = _features(loaded.model, *inputs)
    ref, _ = _features(tiny_clip, *inputs)
    assert not torch.equal(img, ref) and torch.allclose(img, ref, atol=5e-2, rtol=5e-2)


def test_torchscript_archive_loads_same_weights(tiny_clip, inputs, tmp_path, monkeypatch):
    path = tmp_path / "tiny_jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(tiny_clip, inputs, check_trace=False)
        torch.jit.save(traced, str(path))
    assert set(traced.state_dict()) == set(tiny_clip.state_dict())

    def no_plain_load(*args, **kwargs):
        raise AssertionError("a TorchScript archive must not go through torch.load")

    monkeypatch.setattr(torch, "load", no_plain_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_clip(str(path))
    assert not [w for w in caught if "torch.jit" in str(w.message)], "jit deprecation warning not silenced"
    for a, b in zip(_features(loaded.model, *inputs), _features(tiny_clip, *inputs)):
        assert torch.equal(a, b)


def _oc_resnet(head_width: int = 64, seed: int = 0) -> torch.nn.Module:
    """A small open_clip ModifiedResNet CLIP with non-trivial BatchNorm statistics and attention
    sharp enough that the number of pooling heads matters."""
    torch.manual_seed(seed)
    oc = open_clip.CLIP(embed_dim=48, quick_gelu=True,
                        vision_cfg=dict(layers=(1, 2, 1, 1), width=16, image_size=224, head_width=head_width),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)).eval()
    with torch.no_grad():
        for module in oc.visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
        oc.visual.attnpool.q_proj.weight.mul_(30)
        oc.visual.attnpool.k_proj.weight.mul_(30)
    return oc


def test_resnet_clip_matches_open_clip_and_round_trips_through_openai_layout(inputs, tmp_path):
    oc = _oc_resnet()
    ours = convert_open_clip(oc)
    config = ours.config
    assert config.is_resnet and config.vision_layers == (1, 2, 1, 1) and config.vision_patch_size is None
    assert config.vision_width == 16 and config.resolved_vision_heads == 8 and config.image_resolution == 224
    image, text = inputs
    with torch.no_grad():
        ref_image, ref_text = oc.encode_image(image), oc.encode_text(text)
    got_image, got_text = _features(ours, image, text)
    assert torch.allclose(got_image, ref_image, atol=1e-5) and torch.allclose(got_text, ref_text, atol=1e-5)
    with torch.no_grad():  # the comparison can fail: other pooling heads give other features
        ours.visual.attnpool.num_heads = 4
        assert not torch.allclose(ours.encode_image(image), ref_image, atol=1e-2)
        ours.visual.attnpool.num_heads = 8

    path = tmp_path / "rn_openai_layout.pt"
    save_openai_state_dict(ours, path)
    keys = set(torch.load(path, weights_only=True))
    assert {"visual.attnpool.positional_embedding", "visual.layer2.1.bn3.running_var",
            "visual.layer1.0.downsample.0.weight"} <= keys and "visual.proj" not in keys
    loaded = load_clip(str(path))
    assert loaded.model.config == config and loaded.input_resolution == 224
    for a, b in zip(_features(loaded.model, image, text), (ref_image, ref_text)):
        assert torch.allclose(a, b, atol=1e-5)
    # Exports without BatchNorm's unused num_batches_tracked counters load too.
    trimmed = tmp_path / "no_counters.pt"
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items()
                if not k.endswith("num_batches_tracked")}, trimmed)
    assert torch.allclose(_features(load_clip(str(trimmed)).model, image, text)[0], ref_image, atol=1e-5)
    # Pooling heads other than width * 32 // 64 cannot be told from the shapes: refused on save.
    with pytest.raises(ValueError, match="vision_heads"):
        save_openai_state_dict(convert_open_clip(_oc_resnet(head_width=32)), tmp_path / "other_heads.pt")


def test_resnet_cast_keeps_batchnorm_statistics_exact(inputs):
    from restore.clip.model import TINY_RN_CONFIG

    torch.manual_seed(0)
    model = CLIP(TINY_RN_CONFIG).eval()
    with torch.no_grad():
        for module in model.visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.normal_()
    bn = model.visual.layer3[0].bn2
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.weight.detach().clone())
    reference = _features(model, *inputs)[0]
    model.cast(torch.bfloat16)
    assert model.visual.conv1.weight.dtype == torch.bfloat16 and model.text_projection.dtype == torch.bfloat16
    assert model.logit_scale.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip((bn.running_mean, bn.running_var, bn.weight), stats))
    features = _features(model, *inputs)[0]
    assert features.dtype == torch.bfloat16
    assert torch.allclose(features.float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())


def test_openai_resnet_names_resolve_to_their_files(tmp_path, inputs, monkeypatch):
    from restore.evaluation.aggregate import RANDOM_BACKBONES

    assert {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "tiny-rn"} <= set(available_models())
    assert RANDOM_BACKBONES == {clip_loader.TINY_NAME, clip_loader.TINY_RN_NAME}  # tables flag both as random
    with pytest.raises(FileNotFoundError) as err:
        load_clip("RN50", cache_dir=str(tmp_path))
    assert os.path.join(str(tmp_path), "RN50.pt") in str(err.value) and OPENAI_MODELS["RN50"][0] in str(err.value)
    tiny_rn = load_clip("tiny-rn").model
    save_openai_state_dict(tiny_rn, tmp_path / "RN50.pt")
    url, _ = OPENAI_MODELS["RN50"]
    monkeypatch.setitem(OPENAI_MODELS, "RN50", (url, sha256_file(tmp_path / "RN50.pt")))
    loaded = load_clip("RN50", cache_dir=str(tmp_path))
    assert loaded.model.config.is_resnet and not loaded.random_weights
    assert torch.equal(_features(loaded.model, *inputs)[0], _features(tiny_rn, *inputs)[0])


def test_non_clip_state_dicts_say_what_the_backbone_must_be(tmp_path, tiny_clip):
    """A plain module or a trained prompt checkpoint given as the backbone; a CLIP dict missing keys."""
    cases = {"linear": torch.nn.Linear(4, 2).state_dict(),
             "prompt": {"prompt_learner.ctx": torch.zeros(4, 64), "prompt_learner.token_prefix": torch.zeros(3, 1, 64)},
             "partial": {k: v for k, v in tiny_clip.state_dict().items() if k != "ln_final.weight"}}
    for name, state in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(ValueError, match="Not an OpenAI-layout CLIP state dict") as err:
            load_clip(str(path))
        assert "--model-dir" in str(err.value)
    assert "'ln_final.weight'" in str(err.value)


# --- OpenAI names: cache folder, SHA256, missing files, in-memory cache ----------------------


def test_openai_table_is_consistent():
    for name, (url, sha) in OPENAI_MODELS.items():
        assert url.split("/")[-2] == sha and len(sha) == 64, name
        assert url.endswith("/" + name.replace("/", "-").replace("@", "-") + ".pt"), name
    assert OPENAI_MODELS["ViT-B/16"][1] == "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    assert {"ViT-B/16", "ViT-B/32", "ViT-L/14", "ViT-L/14@336px", "tiny"} <= set(available_models())


def test_sha256_checked_before_any_unpickling(tiny_clip, inputs, tmp_path, monkeypatch):
    cache = tmp_path / "clip_cache"
    file = cache / "ViT-B-16.pt"
    save_openai_state_dict(tiny_clip, file)
    url = OPENAI_MODELS["ViT-B/16"][0]
    wrong = "0" * 64
    monkeypatch.setitem(OPENAI_MODELS, "ViT-B/16", (url, wrong))

    def forbidden(*args, **kwargs):
        raise AssertionError("file was read before its hash was verified")

    real_load = torch.load
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    with pytest.raises(ChecksumError) as err:
        load_clip("ViT-B/16", cache_dir=str(cache))
    message = str(err.value)
    actual = sha256_file(file)
    assert str(file) in message and wrong in message and actual in message and url in message

    monkeypatch.setattr(torch, "load", real_load)
    monkeypatch.setitem(OPENAI_MODELS, "ViT-B/16", (url, actual))
    loaded = load_clip("ViT-B/16", cache_dir=str(cache))
    assert not loaded.random_weights
    for a, b in zip(_features(loaded.model, *inputs), _features(tiny_clip, *inputs)):
        assert torch.equal(a, b)
    # The file stem is an alias, and $CLIP_CACHE is honoured when no cache_dir is given.
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    assert load_clip("ViT-B-16").model.config == tiny_clip.config


def test_missing_openai_file_says_where_and_from_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        load_clip("ViT-B/16", cache_dir=str(tmp_path))
    message = str(err.value)
    assert os.path.join(str(tmp_path), "ViT-B-16.pt") in message
    assert OPENAI_MODELS["ViT-B/16"][0] in message

    env_dir = tmp_path / "from_env"
    monkeypatch.setenv("CLIP_CACHE", str(env_dir))
    with pytest.raises(FileNotFoundError, match=str(env_dir / "ViT-L-14-336px.pt")):
        load_clip("ViT-L/14@336px")


def test_second_load_hits_memory_cache_and_returns_independent_copy(tiny_clip, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_openai_state_dict(tiny_clip, path)
    first = load_clip(str(path)).model

    def must_not_read(*args, **kwargs):
        raise AssertionError("checkpoint read again instead of using the in-memory cache")

    monkeypatch.setattr(clip_loader, "read_state_dict", must_not_read)
    second = load_clip(str(path), precision="fp16").model
    assert second is not first and second.dtype == torch.float16
    with torch.no_grad():
        first.logit_scale.add_(1.0)
    third = load_clip(str(path)).model
    assert torch.equal(third.logit_scale, tiny_clip.logit_scale)
    assert torch.equal(third.visual.proj, tiny_clip.visual.proj)


def test_unknown_names():
    with pytest.raises(ValueError, match="Unknown CLIP backbone"):
        load_clip("ViT-Q/99")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip("/nonexistent/dir/weights.pt")
    with pytest.raises(ValueError, match="precision"):
        load_clip("tiny", precision="fp8")


# --- tiny --------------------------------------------------------------------------------------


def test_tiny_is_random_loud_and_deterministic(tiny_clip, capsys):
    rng_before = torch.random.get_rng_state()
    loaded = load_clip("tiny")
    assert torch.equal(rng_before, torch.random.get_rng_state()), "loading tiny changed the global RNG"
    out = capsys.readouterr().out
    assert "WARNING: backbone 'tiny' has RANDOM weights: numbers are meaningless" in out
    assert loaded.random_weights and loaded.source == "random"
    assert loaded.model.config == TINY_CONFIG and not loaded.model.training
    # Same weights as the conftest fixture (seed 0) and on every load; the warning repeats.
    for (k, a), b in zip(loaded.model.state_dict().items(), tiny_clip.state_dict().values()):
        assert torch.equal(a, b), k
    again = load_clip("tiny", precision="bf16")
    assert again.model.dtype == torch.bfloat16
    assert "RANDOM weights" in capsys.readouterr().out
    # logit_scale stays fp32 in a bf16 / fp16 model: log(100) rounded to bf16 gives exp = 98.86
    for dtype in (torch.bfloat16, torch.float16):
        model = CLIP(TINY_CONFIG)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100.0))
        model.cast(dtype)
        assert model.visual.conv1.weight.dtype == dtype and model.text_projection.dtype == dtype
        assert model.logit_scale.dtype == torch.float32
        assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    assert load_clip("tiny", precision="bf16").model.logit_scale.dtype == torch.float32


# --- open_clip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_conversion_is_exact(quick_gelu):
    oc = _oc_model(quick_gelu=quick_gelu)
    ours = convert_open_clip(oc)
    assert ours.config.quick_gelu is quick_gelu
    assert ours.config.vision_heads == 2 and ours.config.transformer_heads == 2
    g = torch.Generator().manual_seed(2)
    image = torch.randn(3, 3, 32, 32, generator=g)
    text = tokenize(TEXTS[:3])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(image), oc.encode_image(image), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.encode_text(text), oc.encode_text(text), rtol=1e-5, atol=1e-6)
        assert torch.equal(ours.logit_scale, oc.logit_scale)
    # The activation matters: the other variant gives different text features.
    other = _oc_model(quick_gelu=not quick_gelu)
    with torch.no_grad():
        assert not torch.allclose(other.encode_text(text), ours.encode_text(text))


def test_open_clip_unsupported_variants_are_refused():
    with pytest.raises(ValueError, match="layer scale"):
        convert_open_clip(_oc_model(ls_init_value=0.1))
    with pytest.raises(ValueError, match="pool_type"):
        convert_open_clip(_oc_model(pool_type="avg"))
    custom = open_clip.CustomTextCLIP(**OC_TINY_CFG).eval()
    with pytest.raises(ValueError, match="CustomTextCLIP"):
        convert_open_clip(custom)


def test_open_clip_backbone_by_name(tmp_path, monkeypatch, capsys):
    factory = open_clip.factory
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "restore-test-tiny.json").write_text(json.dumps(OC_TINY_CFG))
    open_clip.add_model_config(cfg_dir)

    oc = _oc_model(seed=3)
    weights = tmp_path / "oc_weights.pt"
    torch.save(oc.state_dict(), weights)
    loaded = load_clip(f"open_clip:restore-test-tiny/{weights}")  # absolute path after the first '/'
    assert not loaded.random_weights and loaded.input_resolution == 32
    assert loaded.mean == OPENAI_MEAN and loaded.interpolation == "bicubic"
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    text = tokenize(TEXTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(image), oc.encode_image(image), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.model.encode_text(text), oc.encode_text(text), rtol=1e-5, atol=1e-6)

    capsys.readouterr()
    random_model = load_clip("open_clip:restore-test-tiny")
    assert random_model.random_weights and "RANDOM weights" in capsys.readouterr().out

    with pytest.raises(ValueError, match="no pretrained tag"):
        load_clip("open_clip:restore-test-tiny/no_such_tag")


def test_save_refuses_architectures_that_would_not_reload(tmp_path):
    gelu_model = CLIP(CLIPConfig(**{**TINY_CONFIG.__dict__, "quick_gelu": False}))
    with pytest.raises(ValueError, match="quick_gelu"):
        save_openai_state_dict(gelu_model, tmp_path / "gelu.pt")
    assert not (tmp_path / "gelu.pt").exists()


@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_equals_multihead_attention(masked):
    """Attention: same random init, keys and outputs/gradients as nn.MultiheadAttention(batch_first)."""
    from torch import nn

    from restore.clip.model import Attention, causal_mask

    torch.manual_seed(3)
    ours = Attention(32, 4)
    torch.manual_seed(3)
    reference = nn.MultiheadAttention(32, 4, batch_first=True)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():  # same RNG draws in the same order
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():  # non-zero biases, so a wrong bias slice would show
        for param in reference.parameters():
            param.normal_()
    ours.load_state_dict(reference.state_dict(), strict=True)
    mask = causal_mask(7) if masked else None
    x = torch.randn(5, 7, 32, requires_grad=True)
    y = ours(x, mask)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = reference(x2, x2, x2, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-3, atol=1e-3)  # fp32 round-off of large sums
    torch.testing.assert_close(ours.in_proj_weight.grad, reference.in_proj_weight.grad, rtol=1e-3, atol=1e-3)
    if masked:  # token 0 sees itself only: changing later tokens leaves it unchanged
        x3 = x.detach().clone()
        x3[:, 1:] += 1.0
        torch.testing.assert_close(ours(x3, mask)[:, 0], y[:, 0].detach())
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, 4)
