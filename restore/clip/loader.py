"""Loading a CLIP backbone by name: OpenAI checkpoints, local files, open_clip models, or ``tiny``.

Backbone names accepted by :func:`load_clip`:

* an OpenAI name (``"ViT-B/16"``, ``"ViT-B/32"``, ``"ViT-L/14"``, ``"ViT-L/14@336px"``; the file
  stem ``"ViT-B-16"`` also works). The file (``ViT-B-16.pt`` ...) is looked up in ``cache_dir``,
  else ``$CLIP_CACHE``, else ``~/.cache/clip``; nothing is downloaded. Its SHA256 is checked
  before anything in it is read. ResNet names (``RN50``, ``RN101``, ``RN50x4`` ...) load too; their
  image tower has no transformer layers, so only methods that prompt the text side alone (CoOp,
  CoCoOp, KgCoOp, zero-shot CLIP, language-only IVLP) run on them.
* a path to a checkpoint file: an OpenAI TorchScript archive, a plain ``torch.save`` state dict
  (optionally under a ``"state_dict"`` key, ``module.`` prefixes stripped) or a ``.safetensors``
  file, in OpenAI's key layout. The architecture is inferred from the shapes (heads = width // 64,
  QuickGELU, as in OpenAI's models; give open_clip weights as ``open_clip:<MODEL>/<FILE>`` so that
  heads and activation come from the open_clip config). Explicit paths are not hash-checked;
  plain state dicts are read with ``weights_only=True``.
* ``"tiny"``: :data:`~restore.clip.model.TINY_CONFIG` with fixed-seed RANDOM weights, for tests
  and demos (a warning is printed on stdout every time); ``"tiny-rn"`` is the same with a small
  ResNet image tower (:data:`~restore.clip.model.TINY_RN_CONFIG`).
* ``"open_clip:<MODEL>/<TAG>"``: an open_clip architecture with one of its pretrained tags,
  e.g. ``"open_clip:ViT-B-16/laion2b_s34b_b88k"`` (open_clip downloads it into ``cache_dir`` or
  its own cache). ``"open_clip:<MODEL>/<FILE>"`` loads a local weights file instead (everything
  after the first ``/`` is the path, so ``"open_clip:ViT-B-16//data/w.bin"`` for an absolute
  path); ``"open_clip:local-dir:<DIR>"`` and ``"open_clip:hf-hub:<ORG/REPO>"`` are passed to
  open_clip as is; ``"open_clip:<MODEL>"`` alone gives random weights (with the warning). Weights
  trained with QuickGELU need a ``-quickgelu`` model name when given as a file; for tags it is
  chosen automatically. Only standard ViT and ModifiedResNet CLIPs convert (no custom/HF text
  towers, layer scale, attentional pooling in a ViT, SigLIP logit bias...); others raise
  ``ValueError``.

Models are built once per process and kept in memory; each call returns a fresh deep copy.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import threading
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from restore.clip.model import (
    CLIP,
    TINY_CONFIG,
    TINY_RN_CONFIG,
    CLIPConfig,
    build_model,
    config_from_state_dict,
)
from restore.engine.serialization import corrupted_sentence, safe_torch_load

__all__ = [
    "OPENAI_MODELS", "OPENAI_MEAN", "OPENAI_STD", "ChecksumError", "LoadedCLIP", "available_models",
    "clear_cache", "convert_open_clip", "default_cache_dir", "is_random_backbone", "load_clip",
    "openai_checkpoint_path", "read_state_dict", "save_openai_state_dict", "sha256_file",
]

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"


def _openai(sha256: str, filename: str) -> tuple[str, str]:
    return f"{_OPENAI_BASE}/{sha256}/{filename}", sha256


#: OpenAI CLIP checkpoints: name -> (download URL, SHA256 of the file). The hash is also the
#: second-to-last segment of the URL.
OPENAI_MODELS: dict[str, tuple[str, str]] = {
    "RN50": _openai("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": _openai("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": _openai("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": _openai("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": _openai("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": _openai("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": _openai("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                              "ViT-L-14-336px.pt"),
}

TINY_NAME = "tiny"
TINY_RN_NAME = "tiny-rn"
_TINY_CONFIGS: dict[str, CLIPConfig] = {TINY_NAME: TINY_CONFIG, TINY_RN_NAME: TINY_RN_CONFIG}
OPEN_CLIP_PREFIX = "open_clip:"
_TINY_SEED = 0
_PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32, "amp": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}


class ChecksumError(RuntimeError):
    """A checkpoint file's SHA256 differs from the expected one (the file was not read)."""


@dataclass
class LoadedCLIP:
    """A loaded backbone and the preprocessing it was trained with.

    Args:
        model: the CLIP, in eval mode, on the requested device and precision.
        name: the backbone name as given to :func:`load_clip` (stripped).
        mean: per-channel normalisation mean (RGB, images in [0, 1]).
        std: per-channel normalisation std.
        input_resolution: image side length the vision tower expects.
        random_weights: True when the weights are random (``tiny``, untagged open_clip models).
        source: where the weights came from (file path, open_clip spec, or ``"random"``).
        interpolation: resize interpolation used in training (``"bicubic"`` for CLIP).
    """

    model: CLIP
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_resolution: int
    random_weights: bool
    source: str
    interpolation: str = "bicubic"


@dataclass
class _Entry:
    model: CLIP  # fp32, CPU, eval; never handed out directly
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    random_weights: bool
    source: str
    interpolation: str


_CACHE: dict[tuple[Any, ...], _Entry] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every backbone kept in memory by :func:`load_clip`."""
    with _CACHE_LOCK:
        _CACHE.clear()


def available_models() -> list[str]:
    """Names :func:`load_clip` accepts without a path: OpenAI names, ``"tiny"`` and ``"tiny-rn"``.

    Any existing checkpoint path and ``"open_clip:<MODEL>[/<TAG or FILE>]"`` are accepted too.
    """
    return list(OPENAI_MODELS) + list(_TINY_CONFIGS)


def is_random_backbone(name: str | os.PathLike[str]) -> bool:
    """True if :func:`load_clip` gives ``name`` RANDOM weights (``tiny``, ``tiny-rn``, ``open_clip:<MODEL>``
    without a tag or file); decided from the name alone, nothing is loaded."""
    name = os.fspath(name).strip()
    if name in _TINY_CONFIGS:
        return True
    return name.startswith(OPEN_CLIP_PREFIX) and _open_clip_random(name[len(OPEN_CLIP_PREFIX):])


def _open_clip_random(spec: str) -> bool:
    """An open_clip spec without pretrained weights (no ``/<TAG or FILE>``, not hf-hub / local-dir)."""
    return not spec.startswith(("hf-hub:", "local-dir:")) and not spec.partition("/")[2]


def default_cache_dir() -> str:
    """Folder holding OpenAI checkpoint files: ``$CLIP_CACHE`` if set, else ``~/.cache/clip``."""
    return os.path.expanduser(os.environ.get("CLIP_CACHE") or os.path.join("~", ".cache", "clip"))


def openai_checkpoint_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Absolute path where the checkpoint of OpenAI model ``name`` is expected."""
    url, _ = OPENAI_MODELS[_openai_name(name)]
    folder = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    return os.path.abspath(os.path.join(os.path.expanduser(folder), os.path.basename(url)))


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a CPU state dict without building a model.

    TorchScript archives (OpenAI's files) are opened with ``torch.jit.load``; ``.safetensors``
    with safetensors; anything else with ``torch.load(weights_only=True)``, unwrapping a
    ``"state_dict"`` entry and a ``module.`` prefix.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    if _is_torchscript(path):  # TorchScript's own unpickler knows no Python globals: nothing runs
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
                module = torch.jit.load(path, map_location="cpu")
        except RuntimeError as err:
            raise RuntimeError(corrupted_sentence(path, "a CLIP weight file", "download it again")) from err
        return {k: v for k, v in module.state_dict().items()}
    obj = safe_torch_load(path, what="a CLIP weight file", expected="a state dict of tensors",
                          corrupted_advice="download it again",
                          refused_advice="re-save the weights with torch.save(model.state_dict(), path)")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__}).")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def save_openai_state_dict(model: CLIP, path: str | os.PathLike[str]) -> None:
    """Write ``model`` as a plain state dict in OpenAI's key layout (reloadable by path).

    Raises:
        ValueError: the architecture cannot be inferred back from the saved shapes (attention heads
            other than width // 64, or GELU instead of QuickGELU), so a reload would differ.
    """
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    inferred = _canonical(config_from_state_dict(state))
    actual = _canonical(model.config)
    if inferred != actual:
        diffs = [f"{f.name}: model {getattr(actual, f.name)!r}, file would give {getattr(inferred, f.name)!r}"
                 for f in dataclasses.fields(actual) if getattr(actual, f.name) != getattr(inferred, f.name)]
        raise ValueError("This model cannot be saved in OpenAI's layout without losing its architecture: "
                         + "; ".join(diffs))
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.fspath(path))


def convert_open_clip(oc_model: nn.Module) -> CLIP:
    """Convert an ``open_clip.CLIP`` with a standard ViT or ModifiedResNet image tower and the
    standard text transformer to our :class:`CLIP` (fp32, eval).

    Raises:
        ValueError: the model uses a feature our CLIP does not implement (custom or HF text tower,
            timm image tower, layer scale, attentional pooling in a ViT, logit bias, ...).
    """
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet as OCModifiedResNet
    from open_clip.transformer import QuickGELU as OCQuickGELU
    from open_clip.transformer import ResidualAttentionBlock as OCBlock
    from open_clip.transformer import VisionTransformer as OCVisionTransformer

    kind = type(oc_model).__name__
    if type(oc_model) is not open_clip.CLIP:
        raise ValueError(f"Unsupported open_clip model class {kind}: only open_clip.CLIP with the built-in "
                         "text transformer converts (no CustomTextCLIP/HF text towers, CoCa, SigLIP-style towers).")
    visual = oc_model.visual
    resnet = isinstance(visual, OCModifiedResNet)
    if not resnet and not isinstance(visual, OCVisionTransformer):
        raise ValueError(f"Unsupported open_clip image tower {type(visual).__name__}: only the built-in "
                         "ViT and ModifiedResNet convert (timm towers are not supported).")
    problems: list[str] = []
    if not resnet:
        if getattr(visual, "attn_pool", None) is not None:
            problems.append("attentional pooling in the image tower")
        if getattr(visual, "pool_type", "tok") != "tok":
            problems.append(f"image pool_type {visual.pool_type!r} (need 'tok')")
        if getattr(visual, "final_ln_after_pool", False):
            problems.append("final_ln_after_pool in the image tower")
        if isinstance(visual.ln_pre, nn.Identity):
            problems.append("no ln_pre in the image tower")
        if len(set(visual.image_size)) != 1 or len(set(visual.patch_size)) != 1:
            problems.append(f"non-square image {visual.image_size} or patch {visual.patch_size}")
    if getattr(oc_model, "text_pool_type", "argmax") != "argmax":
        problems.append(f"text pool_type {oc_model.text_pool_type!r} (need 'argmax')")
    if oc_model.attn_mask is None:
        problems.append("text tower without causal mask")
    if not isinstance(oc_model.text_projection, nn.Parameter):
        problems.append(f"text projection of type {type(oc_model.text_projection).__name__} (need a matrix)")
    if getattr(oc_model, "logit_bias", None) is not None:
        problems.append("logit_bias (sigmoid-loss model)")

    activations: set[str] = set()
    towers = [("text", oc_model.transformer)] + ([] if resnet else [("image", visual.transformer)])
    for tower_name, tower in towers:
        for i, block in enumerate(tower.resblocks):
            where = f"{tower_name} block {i}"
            if type(block) is not OCBlock:
                problems.append(f"{where} is {type(block).__name__} (qk-norm, scaled attention, ...)")
                break
            if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
                problems.append(f"layer scale in {where}")
                break
            if block.mlp.c_fc.out_features != 4 * block.mlp.c_fc.in_features:
                problems.append(f"mlp ratio {block.mlp.c_fc.out_features / block.mlp.c_fc.in_features} in {where}")
                break
            act = block.mlp.gelu
            if isinstance(act, OCQuickGELU):
                activations.add("quick_gelu")
            elif type(act) is nn.GELU and act.approximate == "none":
                activations.add("gelu")
            else:
                problems.append(f"activation {act!r} in {where}")
                break
    for mod_name, mod in oc_model.named_modules():
        if isinstance(mod, nn.LayerNorm) and (mod.eps != 1e-5 or not mod.elementwise_affine):
            problems.append(f"LayerNorm {mod_name} with eps={mod.eps}, affine={mod.elementwise_affine}")
            break
    if len(activations) > 1:
        problems.append("different activations in the two towers")
    if problems:
        raise ValueError(f"Unsupported open_clip {kind} variant: " + "; ".join(problems))

    vision: dict[str, Any]
    if resnet:
        stages = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
        vision = dict(image_resolution=int(visual.image_size), vision_width=stages[0][0].conv1.out_channels,
                      vision_layers=tuple(len(stage) for stage in stages), vision_patch_size=None,
                      vision_heads=visual.attnpool.num_heads)
    else:
        vision = dict(image_resolution=visual.image_size[0], vision_width=visual.conv1.out_channels,
                      vision_layers=len(visual.transformer.resblocks), vision_patch_size=visual.patch_size[0],
                      vision_heads=visual.transformer.resblocks[0].attn.num_heads)
    config = CLIPConfig(
        embed_dim=oc_model.text_projection.shape[1],
        context_length=oc_model.context_length,
        vocab_size=oc_model.vocab_size,
        transformer_width=oc_model.transformer.width,
        transformer_heads=oc_model.transformer.resblocks[0].attn.num_heads,
        transformer_layers=len(oc_model.transformer.resblocks),
        quick_gelu=activations == {"quick_gelu"},
        **vision,
    )
    state = {k: v.detach().to("cpu", torch.float32) for k, v in oc_model.state_dict().items() if k != "attn_mask"}
    if state["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(())
    model = CLIP(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"Unsupported open_clip {kind} variant: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}")
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def load_clip(name: str | os.PathLike[str], device: str | torch.device = "cpu",
              cache_dir: str | os.PathLike[str] | None = None, precision: str = "fp32") -> LoadedCLIP:
    """Load a CLIP backbone (see the module docstring for the accepted names).

    Args:
        name: OpenAI name, checkpoint path, ``"tiny"`` or ``"open_clip:<MODEL>[/<TAG or FILE>]"``.
        device: device of the returned model.
        cache_dir: folder with OpenAI checkpoint files (default ``$CLIP_CACHE`` or
            ``~/.cache/clip``); for open_clip names, open_clip's download cache.
        precision: ``"fp32"``, ``"amp"`` (fp32 weights), ``"fp16"`` or ``"bf16"``.

    Returns:
        A :class:`LoadedCLIP`; its ``model`` is a fresh copy, safe to modify.

    Raises:
        FileNotFoundError: the checkpoint is missing (the message gives the path and the URL).
        ChecksumError: an OpenAI checkpoint's SHA256 is wrong (nothing was unpickled).
        ValueError: unknown name or unsupported open_clip variant.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    name = os.fspath(name).strip()
    if name in _TINY_CONFIGS:
        entry = _cached((name,), lambda: _build_tiny(_TINY_CONFIGS[name]))
    elif name.startswith(OPEN_CLIP_PREFIX):
        entry = _load_open_clip(name[len(OPEN_CLIP_PREFIX):], cache_dir)
    elif _openai_name(name) in OPENAI_MODELS:
        entry = _load_openai(_openai_name(name), cache_dir)
    elif os.path.isfile(os.path.expanduser(name)):
        path = os.path.abspath(os.path.expanduser(name))
        entry = _cached(_file_key(path), lambda: _entry_from_file(path))
    else:
        raise _unknown_name(name)

    if entry.random_weights:
        print(f"WARNING: backbone {name!r} has RANDOM weights: numbers are meaningless", flush=True)
    model = copy.deepcopy(entry.model)
    model = model.to(device=device).cast(_PRECISIONS[precision]).eval()
    return LoadedCLIP(model=model, name=name, mean=entry.mean, std=entry.std,
                      input_resolution=model.config.image_resolution, random_weights=entry.random_weights,
                      source=entry.source, interpolation=entry.interpolation)


# ---------------------------------------------------------------------------------------------
# internals


def _openai_name(name: str) -> str:
    """Canonical OpenAI name for ``name`` or a file stem such as ``ViT-B-16`` (else ``name``)."""
    if name in OPENAI_MODELS:
        return name
    for key, (url, _) in OPENAI_MODELS.items():
        if os.path.splitext(os.path.basename(url))[0] == name:
            return key
    return name


def _canonical(config: CLIPConfig) -> CLIPConfig:
    return dataclasses.replace(config, vision_heads=config.resolved_vision_heads)


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _file_key(path: str, sha256: str | None = None) -> tuple[Any, ...]:
    st = os.stat(path)
    return ("file", path, st.st_size, st.st_mtime_ns, sha256)


def _cached(key: tuple[Any, ...], build: Any) -> _Entry:
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            with torch.random.fork_rng(devices=[]):  # loading never draws from the caller's RNG (see clip.replay)
                entry = build()
            _CACHE[key] = entry
        return entry


def _build_tiny(config: CLIPConfig) -> _Entry:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = CLIP(config).eval()
    return _Entry(model, OPENAI_MEAN, OPENAI_STD, random_weights=True, source="random", interpolation="bicubic")


def _entry_from_file(path: str) -> _Entry:
    model = build_model(read_state_dict(path))
    return _Entry(model, OPENAI_MEAN, OPENAI_STD, random_weights=False, source=path, interpolation="bicubic")


def _load_openai(name: str, cache_dir: str | os.PathLike[str] | None) -> _Entry:
    url, expected = OPENAI_MODELS[name]
    path = openai_checkpoint_path(name, cache_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP checkpoint for {name!r} not found: expected the file {path}\n"
            f"Nothing is downloaded automatically. Download it from\n  {url}\n"
            f"and save it as that file, e.g.\n  mkdir -p {os.path.dirname(path)} && curl -L -o {path} {url}\n"
            "or point MODEL.BACKBONE.CACHE_DIR (or $CLIP_CACHE) at the folder that already holds it "
            "(a copy in ~/.cache/clip from OpenAI's clip package works).")

    def build() -> _Entry:
        _verify_sha256(path, expected, name, url)
        return _entry_from_file(path)

    return _cached(_file_key(path, expected), build)


def _verify_sha256(path: str, expected: str, name: str, url: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"SHA256 mismatch for {path} ({name}):\n  expected {expected}\n  actual   {actual}\n"
            f"The file is corrupt, truncated or not OpenAI's {name} checkpoint; it was not loaded. "
            f"Delete it and download it again from {url}")


def _load_open_clip(spec: str, cache_dir: str | os.PathLike[str] | None) -> _Entry:
    if not spec:
        raise ValueError("Empty open_clip spec: use 'open_clip:<MODEL>/<TAG>' or 'open_clip:<MODEL>/<FILE>'.")
    if spec.startswith(("hf-hub:", "local-dir:")):
        model_name, pretrained = spec, None
    else:
        model_name, _, tail = spec.partition("/")
        pretrained = tail or None
    random_weights = _open_clip_random(spec)
    key: tuple[Any, ...] = ("open_clip", spec)
    if pretrained is not None and os.path.isfile(os.path.expanduser(pretrained)):
        pretrained = os.path.abspath(os.path.expanduser(pretrained))
        key = ("open_clip", model_name) + _file_key(pretrained)

    def build() -> _Entry:
        import open_clip

        kwargs: dict[str, Any] = {}
        hint = ""
        if pretrained is not None and not os.path.isfile(pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            if not tag_cfg:
                raise ValueError(
                    f"open_clip has no pretrained tag {pretrained!r} for {model_name!r} and no such file exists. "
                    f"Known tags: {open_clip.list_pretrained_tags_by_model(model_name)}")
            if tag_cfg.get("quick_gelu"):
                kwargs["force_quick_gelu"] = True
            source = tag_cfg.get("url") or tag_cfg.get("hf_hub") or "?"
            hint = (f" Without network access, download the weights ({source}; on the Hugging Face Hub the "
                    f"file is open_clip_pytorch_model.bin or open_clip_model.safetensors) elsewhere and use "
                    f"'open_clip:{model_name}/<path to the file>'; HF_HUB_OFFLINE=1 skips the retries.")
        try:
            oc_model = open_clip.create_model(
                model_name, pretrained=pretrained, device="cpu", precision="fp32",
                cache_dir=os.fspath(cache_dir) if cache_dir is not None else None, **kwargs)
        except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/... on bad specs
            raise RuntimeError(f"open_clip could not create {spec!r}: {e}.{hint}") from e
        preprocess = open_clip.get_model_preprocess_cfg(oc_model)
        model = convert_open_clip(oc_model)
        del oc_model
        return _Entry(model, _triple(preprocess.get("mean"), OPENAI_MEAN), _triple(preprocess.get("std"), OPENAI_STD),
                      random_weights=random_weights, source="random" if random_weights else OPEN_CLIP_PREFIX + spec,
                      interpolation=str(preprocess.get("interpolation") or "bicubic"))

    return _cached(key, build)


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"Expected 3 normalisation values, got {value!r}")
    return values  # type: ignore[return-value]


def _unknown_name(name: str) -> Exception:
    path = os.path.abspath(os.path.expanduser(name))
    if name.startswith(("/", "~", ".")) or name.endswith((".pt", ".pth", ".bin", ".safetensors", ".tar")):
        return FileNotFoundError(f"Checkpoint file not found: {path}")
    return ValueError(
        f"Unknown CLIP backbone {name!r} (and no file {path}). Use one of {available_models()}, a checkpoint "
        "file path, or 'open_clip:<MODEL>/<TAG or FILE>' (e.g. 'open_clip:ViT-B-16/laion2b_s34b_b88k').")
