"""ImageNet-Sketch: test-only, 1000 ImageNet classes drawn as sketches."""

from restore.engine.data.split_datasets import ImageFolderTestset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class ImageNetSketch(ImageFolderTestset):
    dataset_dir = "imagenet-sketch"
    image_subdir = "images"
    anchor = "imagenet_sketch"
    layout = """
imagenet-sketch/
  images/<wnid>/*.JPEG
  classnames.txt   (copy of ImageNet's)
"""
