"""CLIP in OpenAI's state-dict key layout, batch-first, with no method-specific code.

The modules here are plain: ``restore.prompting`` runs them layer by layer to insert prompts.
Key names match OpenAI checkpoints (``visual.transformer.resblocks.0.attn.in_proj_weight``,
``token_embedding.weight``, ``text_projection``...), so those files load with ``strict=True``.
The image tower is a ViT or, for the ``RN*`` checkpoints, CLIP's modified ResNet (attention
pooling instead of global average pooling); only a ViT has layers to put visual prompts into.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as in CLIP (safe for fp16 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in fp32 and cast back; :meth:`CLIP.cast` keeps its statistics in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with :class:`torch.nn.MultiheadAttention`'s parameters and key names
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), batch-first.

    It computes what ``nn.MultiheadAttention(width, heads, batch_first=True)(x, x, x)`` does, but
    projects the batch-first input with one matrix product and runs
    :func:`torch.nn.functional.scaled_dot_product_attention` (the built-in module transposes to
    sequence-first and projects through a slow batched product at small batches). Initialisation
    draws the same random numbers in the same order as the built-in module.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.embed_dim = width
        self.num_heads = heads
        self.batch_first = True
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, tokens, width) -> (batch, tokens, width); ``attn_mask`` is additive (tokens, tokens)."""
        batch, length, width = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block; input and output are (batch, tokens, width)."""

    def __init__(self, width: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        mask = attn_mask.to(h.dtype) if attn_mask is not None else None
        x = x + self.attn(h, mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks stored as ``resblocks`` (OpenAI key layout)."""

    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.heads = heads
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def causal_mask(length: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (length, length) mask: -inf above the diagonal, so token i sees tokens <= i."""
    mask = torch.full((length, length), float("-inf"), device=device, dtype=dtype)
    return mask.triu_(1)


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = input_resolution // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Patch + class embedding + positional embedding: (B, 1 + grid^2, width), before ln_pre."""
        x = self.conv1(image.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.positional_embedding.to(x.dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(self.embed(image))
        x = self.transformer(x)
        return self.ln_post(x[:, 0, :]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride comes from an average pool before the last 1x1 conv (CLIP's
    anti-aliased variant); the shortcut is average pool + 1x1 conv + BN where the shape changes."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, stride=1, bias=False)),
                ("1", BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.relu3(y + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling: the mean of the feature map, as the query, attends over all
    positions (plus itself); returns every output token, token 0 being the pooled feature."""

    def __init__(self, grid: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) feature map -> (B, 1 + H*W, output_dim)."""
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        batch, length, dim = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, heads, dim // heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(y.transpose(1, 2).reshape(batch, length, dim))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: a 3-conv stem with average pooling, anti-aliased bottlenecks and
    attention pooling. ``width`` is the stem's output channels (64 for RN50)."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int,
                 width: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        stages, inplanes = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def stem(self, image: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(image.to(self.conv1.weight.dtype))))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """All attention-pool outputs (B, 1 + grid^2, output_dim); token 0 is the image feature."""
        x = self.stem(image)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(image)[:, 0]


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP; inferred from a state dict or chosen by name.

    A ResNet image tower has ``vision_layers`` = blocks per stage (``(3, 4, 6, 3)`` for RN50),
    ``vision_width`` = stem width and ``vision_patch_size`` = None.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    vision_heads: int | None = None
    quick_gelu: bool = True

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    @property
    def resolved_vision_heads(self) -> int:
        if self.vision_heads:
            return self.vision_heads
        return self.vision_width * 32 // 64 if self.is_resnet else max(1, self.vision_width // 64)


class CLIP(nn.Module):
    """Image and text towers plus ``logit_scale``; ``encode_image``/``encode_text`` are the plain forward."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.context_length = config.context_length
        self.visual: VisionTransformer | ModifiedResNet
        if isinstance(config.vision_layers, tuple):
            self.visual = ModifiedResNet(
                layers=config.vision_layers, output_dim=config.embed_dim, heads=config.resolved_vision_heads,
                input_resolution=config.image_resolution, width=config.vision_width)
        else:
            assert config.vision_patch_size is not None, "a ViT config needs vision_patch_size"
            self.visual = VisionTransformer(
                input_resolution=config.image_resolution, patch_size=config.vision_patch_size,
                width=config.vision_width, layers=config.vision_layers, heads=config.resolved_vision_heads,
                output_dim=config.embed_dim, quick_gelu=config.quick_gelu)
        self.transformer = Transformer(config.transformer_width, config.transformer_layers,
                                       config.transformer_heads, config.quick_gelu)
        self.vocab_size = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.transformer_width))
        self.ln_final = LayerNorm(config.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(config.transformer_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (used for random-weight models); ResNet convolutions He-initialised."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        towers = [self.transformer]
        if isinstance(self.visual, ModifiedResNet):
            for module in self.visual.modules():
                if isinstance(module, nn.Conv2d):  # He init, as torchvision's ResNets (keeps random towers informative)
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            pool = self.visual.attnpool
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=pool.c_proj.in_features ** -0.5)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)  # each residual branch starts as zero
        else:
            towers.append(self.visual.transformer)
        for tower in towers:
            proj_std = (tower.width ** -0.5) * ((2 * tower.layers) ** -0.5)
            attn_std = tower.width ** -0.5
            fc_std = (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def cast(self, dtype: torch.dtype) -> "CLIP":
        """Weights in ``dtype`` (the frozen working precision), except ``logit_scale`` and BatchNorm
        (ResNet towers), kept in fp32: in bf16 CLIP's 4.6052 would round to 4.5938, a logit scale of
        98.9 instead of 100, and BatchNorm statistics would lose their precision."""
        scale = self.logit_scale.detach().float().clone()
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                continue
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    module._buffers[name] = buffer.to(dtype)
        self.logit_scale.data = scale.to(self.logit_scale.device)
        return self

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Plain CLIP text forward over the full 77-token sequence (reference implementation)."""
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.transformer(x, causal_mask(x.shape[1], x.device))
        x = self.ln_final(x)
        eot = text.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def _is_resnet_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return "visual.proj" not in state_dict and "visual.attnpool.positional_embedding" in state_dict


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
    """Infer the architecture of a CLIP (ViT or ResNet image tower) from an OpenAI-layout state dict.

    Shapes do not record attention heads or the activation: heads are width // 64 (ResNet attention
    pooling: stem width * 32 // 64) and the activation is QuickGELU, as in OpenAI's models. Some
    open_clip models differ (ViT-H-14 uses head width 80, LAION models GELU): load those with
    ``load_clip("open_clip:<MODEL>/<FILE>")``.
    """
    resnet = _is_resnet_state_dict(state_dict)
    vision_keys = (("visual.conv1.weight", "visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
                   if resnet else ("visual.proj", "visual.conv1.weight", "visual.positional_embedding"))
    required = vision_keys + ("ln_final.weight", "text_projection", "positional_embedding", "token_embedding.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(
            f"Not an OpenAI-layout CLIP state dict: missing {missing} (it has e.g. {sorted(state_dict)[:5]}). "
            "MODEL.BACKBONE.NAME must name CLIP weights (an OpenAI .pt file, or 'open_clip:<MODEL>/<FILE>' for "
            "open_clip files); a trained prompt checkpoint is loaded with --model-dir, not as the backbone.")
    vision_layers: int | tuple[int, int, int, int]
    patch: int | None
    if resnet:
        stages = [len({k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{i}.")}) for i in range(1, 5)]
        vision_layers = (stages[0], stages[1], stages[2], stages[3])
        vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        image_resolution, patch, vision_heads = grid * 32, None, vision_width * 32 // 64
    else:
        vision_width = state_dict["visual.conv1.weight"].shape[0]
        vision_layers = len({k.split(".")[3] for k in state_dict
                             if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")})
        patch = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_resolution, vision_heads = patch * grid, max(1, vision_width // 64)
    width = state_dict["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=image_resolution,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=width,
        transformer_heads=max(1, width // 64),
        transformer_layers=len({k.split(".")[2] for k in state_dict
                                if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight")}),
        vision_heads=vision_heads,
    )


def build_model(state_dict: dict[str, torch.Tensor], config: CLIPConfig | None = None) -> CLIP:
    """Build a CLIP from an OpenAI-layout state dict (strict load); returned in fp32, eval mode."""
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in ("input_resolution", "context_length", "vocab_size")}
    model = CLIP(config or config_from_state_dict(state_dict))
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked"):  # a BatchNorm counter, unused in eval; some exports drop it
            state_dict.setdefault(key, value)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


def convert_weights_to_fp16(model: nn.Module) -> nn.Module:
    """Cast CLIP's weights to fp16 as OpenAI does (LayerNorms compute in fp32; logit_scale stays fp32)."""
    return model.cast(torch.float16) if isinstance(model, CLIP) else model.half()


# A small CLIP with the real architecture (12+12 layers, 224 px input, real vocabulary) but narrow
# towers, used by tests and demos. Its weights are always random.
TINY_CONFIG = CLIPConfig(
    embed_dim=48, image_resolution=224, vision_layers=12, vision_width=128, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=12,
    vision_heads=2,
)
# The same text tower with a narrow ResNet image tower (one bottleneck per stage, RN50's layout).
TINY_RN_CONFIG = CLIPConfig(
    embed_dim=48, image_resolution=224, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=12,
    vision_heads=4,
)
