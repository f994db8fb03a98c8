"""ImageNet-A (natural adversarial examples): test-only, 200 classes labelled 0..199 in wnid order."""

from restore.engine.data.split_datasets import ImageFolderTestset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class ImageNetA(ImageFolderTestset):
    dataset_dir = "imagenet-adversarial"
    image_subdir = "imagenet-a"
    anchor = "imagenet_a"
    layout = """
imagenet-adversarial/
  imagenet-a/<wnid>/*.jpg   (200 folders; README.txt is ignored)
  classnames.txt            (the full 1000-line ImageNet file)
"""
