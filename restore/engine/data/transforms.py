"""``build_transform``: Dassl's train/test image pipelines, in Dassl's order, with its printed lines.

torchvision is imported when a pipeline is built, not with this module: its import (which pulls in
``torch._dynamo``) costs seconds, and the command lines import this module on every start, also when
they stop on an error before any image is read.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from torchvision.transforms import Compose, InterpolationMode, Normalize

from restore.log import get_logger

logger = get_logger(__name__)

__all__ = ["AVAI_CHOICES", "INTERPOLATION_MODES", "build_transform", "Random2DTranslation", "Cutout",
           "GaussianNoise", "InstanceNormalization"]

AVAI_CHOICES = [
    "random_flip", "random_resized_crop", "normalize", "instance_norm", "random_crop", "random_translation",
    "center_crop", "cutout", "imagenet_policy", "cifar10_policy", "svhn_policy", "randaugment",
    "randaugment_fixmatch", "randaugment2", "gaussian_noise", "colorjitter", "randomgrayscale", "gaussian_blur",
]



class _InterpolationModes(Mapping):
    """``{"bilinear", "bicubic", "nearest"}`` -> torchvision's ``InterpolationMode``, read on first use."""

    _NAMES = ("bilinear", "bicubic", "nearest")

    def __getitem__(self, name: str) -> InterpolationMode:
        if name not in self._NAMES:
            raise KeyError(name)
        from torchvision.transforms import InterpolationMode

        return InterpolationMode[name.upper()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)

    def __repr__(self) -> str:
        return repr(dict(self))


INTERPOLATION_MODES: Mapping[str, InterpolationMode] = _InterpolationModes()


class Random2DTranslation:
    """With probability p: enlarge by 1/8 and take a random (height, width) crop; else resize."""

    def __init__(self, height: int, width: int, p: float = 0.5,
                 interpolation: InterpolationMode | None = None) -> None:
        self.height, self.width, self.p = height, width, p
        self.interpolation = INTERPOLATION_MODES["bilinear"] if interpolation is None else interpolation

    def __call__(self, img: Image.Image) -> Any:
        from torchvision.transforms import functional as F

        if random.uniform(0, 1) > self.p:
            return F.resize(img, [self.height, self.width], self.interpolation)
        new_h, new_w = round(self.height * 1.125), round(self.width * 1.125)
        img = F.resize(img, [new_h, new_w], self.interpolation)
        top = int(round(random.uniform(0, new_h - self.height)))
        left = int(round(random.uniform(0, new_w - self.width)))
        return F.crop(img, top, left, self.height, self.width)


class Cutout:
    """Zero ``n_holes`` random squares of side ``length`` in a CHW tensor."""

    def __init__(self, n_holes: int = 1, length: int = 16) -> None:
        self.n_holes, self.length = n_holes, length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        mask = torch.ones(h, w, dtype=img.dtype)
        for _ in range(self.n_holes):
            y, x = random.randrange(h), random.randrange(w)
            y1, y2 = max(0, y - self.length // 2), min(h, y + self.length // 2)
            x1, x2 = max(0, x - self.length // 2), min(w, x + self.length // 2)
            mask[y1:y2, x1:x2] = 0
        return img * mask


class GaussianNoise:
    """With probability p, add N(mean, std) noise to a tensor."""

    def __init__(self, mean: float = 0.0, std: float = 0.15, p: float = 0.5) -> None:
        self.mean, self.std, self.p = mean, std, p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if random.uniform(0, 1) > self.p:
            return img
        return img + torch.randn(img.size()) * self.std + self.mean


class InstanceNormalization:
    """Normalise each channel of one image to zero mean and unit variance."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[0]
        flat = img.reshape(c, -1)
        mean = flat.mean(1).view(c, 1, 1)
        std = flat.std(1).view(c, 1, 1)
        return (img - mean) / (std + self.eps)


def build_transform(cfg: Any, is_train: bool = True, choices: Sequence[str] | None = None) -> Callable | None:
    """The train (augmenting) or test (resize + center crop) pipeline from ``cfg.INPUT``.

    Returns None when ``INPUT.NO_TRANSFORM``. ``choices`` defaults to ``INPUT.TRANSFORMS``; an unknown
    choice raises ValueError listing the valid ones.
    """
    if cfg.INPUT.NO_TRANSFORM:
        logger.info("Note: no transform is applied!")
        return None
    choices = list(cfg.INPUT.TRANSFORMS if choices is None else choices)
    for choice in choices:
        if choice not in AVAI_CHOICES:
            from ..registry import closest_names

            hint = closest_names(choice, AVAI_CHOICES, n=1)
            raise ValueError(f"Invalid transform choice {choice!r} in INPUT.TRANSFORMS"
                             f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; expected one of {AVAI_CHOICES}")
    if cfg.INPUT.INTERPOLATION not in INTERPOLATION_MODES:
        raise ValueError(f"INPUT.INTERPOLATION must be one of {list(INTERPOLATION_MODES)}, got {cfg.INPUT.INTERPOLATION!r}")
    from torchvision.transforms import Normalize

    normalize = Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD)
    return (_build_train if is_train else _build_test)(cfg, choices, normalize)


def _build_train(cfg: Any, choices: list[str], normalize: Normalize) -> Compose:
    from torchvision.transforms import (AutoAugment, AutoAugmentPolicy, ColorJitter, Compose, GaussianBlur,
                                        RandAugment, RandomApply, RandomCrop, RandomGrayscale,
                                        RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor)

    logger.info("Building transform_train")
    inp = cfg.INPUT
    size = tuple(inp.SIZE)
    interp = INTERPOLATION_MODES[inp.INTERPOLATION]
    tfm: list[Callable] = []
    if "random_crop" not in choices and "random_resized_crop" not in choices:
        logger.info(f"+ resize to {size[0]}x{size[1]}")
        tfm.append(Resize(size, interpolation=interp))
    if "random_translation" in choices:
        logger.info("+ random translation")
        tfm.append(Random2DTranslation(size[0], size[1], interpolation=interp))
    if "random_crop" in choices:
        logger.info(f"+ random crop (padding = {inp.CROP_PADDING})")
        tfm.append(RandomCrop(size, padding=inp.CROP_PADDING))
    if "random_resized_crop" in choices:
        scale = tuple(inp.RRCROP_SCALE)
        logger.info(f"+ random resized crop (size={size}, scale={scale})")
        tfm.append(RandomResizedCrop(size, scale=scale, interpolation=interp))
    if "random_flip" in choices:
        logger.info("+ random flip")
        tfm.append(RandomHorizontalFlip())
    policies = {"imagenet_policy": AutoAugmentPolicy.IMAGENET, "cifar10_policy": AutoAugmentPolicy.CIFAR10,
                "svhn_policy": AutoAugmentPolicy.SVHN}
    for name, policy in policies.items():
        if name in choices:
            logger.info(f"+ {name.replace('_', ' ')}")
            tfm.append(AutoAugment(policy))
    for name in ("randaugment", "randaugment_fixmatch", "randaugment2"):
        if name in choices:  # torchvision's RandAugment stands in for Dassl's three variants
            logger.info(f"+ randaugment (n={inp.RANDAUGMENT_N}, m={inp.RANDAUGMENT_M})")
            tfm.append(RandAugment(num_ops=inp.RANDAUGMENT_N, magnitude=inp.RANDAUGMENT_M))
    if "colorjitter" in choices:
        logger.info(f"+ color jitter (brightness={inp.COLORJITTER_B}, contrast={inp.COLORJITTER_C}, "
              f"saturation={inp.COLORJITTER_S}, hue={inp.COLORJITTER_H})")
        tfm.append(ColorJitter(brightness=inp.COLORJITTER_B, contrast=inp.COLORJITTER_C,
                               saturation=inp.COLORJITTER_S, hue=inp.COLORJITTER_H))
    if "randomgrayscale" in choices:
        logger.info(f"+ random gray scale (p={inp.RGS_P})")
        tfm.append(RandomGrayscale(p=inp.RGS_P))
    if "gaussian_blur" in choices:
        logger.info(f"+ gaussian blur (kernel={inp.GB_K})")
        kernel = inp.GB_K if inp.GB_K % 2 == 1 else inp.GB_K + 1
        tfm.append(RandomApply([GaussianBlur(kernel)], p=inp.GB_P))
    logger.info("+ to torch tensor of range [0, 1]")
    tfm.append(ToTensor())
    if "cutout" in choices:
        logger.info(f"+ cutout (n_holes={inp.CUTOUT_N}, length={inp.CUTOUT_LEN})")
        tfm.append(Cutout(inp.CUTOUT_N, inp.CUTOUT_LEN))
    if "normalize" in choices:
        logger.info(f"+ normalization (mean={inp.PIXEL_MEAN}, std={inp.PIXEL_STD})")
        tfm.append(normalize)
    if "gaussian_noise" in choices:
        logger.info(f"+ gaussian noise (mean={inp.GN_MEAN}, std={inp.GN_STD})")
        tfm.append(GaussianNoise(inp.GN_MEAN, inp.GN_STD))
    if "instance_norm" in choices:
        logger.info("+ instance normalization")
        tfm.append(InstanceNormalization())
    return Compose(tfm)


def _build_test(cfg: Any, choices: list[str], normalize: Normalize) -> Compose:
    from torchvision.transforms import CenterCrop, Compose, Resize, ToTensor

    logger.info("Building transform_test")
    size = tuple(cfg.INPUT.SIZE)
    interp = INTERPOLATION_MODES[cfg.INPUT.INTERPOLATION]
    logger.info(f"+ resize the smaller edge to {max(size)}")
    tfm: list[Callable] = [Resize(max(size), interpolation=interp)]
    logger.info(f"+ {size[0]}x{size[1]} center crop")
    tfm.append(CenterCrop(size))
    logger.info("+ to torch tensor of range [0, 1]")
    tfm.append(ToTensor())
    if "normalize" in choices:
        logger.info(f"+ normalization (mean={cfg.INPUT.PIXEL_MEAN}, std={cfg.INPUT.PIXEL_STD})")
        tfm.append(normalize)
    if "instance_norm" in choices:
        logger.info("+ instance normalization")
        tfm.append(InstanceNormalization())
    return Compose(tfm)
