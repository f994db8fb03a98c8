"""Describable Textures (DTD): 47 texture classes."""

from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class DescribableTextures(SplitDataset):
    dataset_dir = "dtd"
    image_subdir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    anchor = "dtd"
    layout = """
dtd/
  images/<class>/<image>.jpg
  split_zhou_DescribableTextures.json
"""
