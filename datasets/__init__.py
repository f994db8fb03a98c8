"""The 15 CoOp-family benchmark loaders and the group-robustness sets (Waterbirds, CelebA); importing this
package registers them in DATASET_REGISTRY."""

from . import (caltech101, dtd, eurosat, fgvc_aircraft, food101, imagenet, imagenet_a, imagenet_r,  # noqa: F401
               imagenet_sketch, imagenetv2, oxford_flowers, oxford_pets, stanford_cars, sun397, ucf101)
from . import celeba, waterbirds  # noqa: F401,E402  group robustness (Waterbirds, CelebA)
