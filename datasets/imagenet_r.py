"""ImageNet-R (renditions): test-only, 200 classes labelled 0..199 in wnid order."""

from restore.engine.data.split_datasets import ImageFolderTestset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class ImageNetR(ImageFolderTestset):
    dataset_dir = "imagenet-rendition"
    image_subdir = "imagenet-r"
    anchor = "imagenet_r"
    layout = """
imagenet-rendition/
  imagenet-r/<wnid>/*.jpg   (200 folders; README.txt is ignored)
  classnames.txt            (the full 1000-line ImageNet file)
"""
