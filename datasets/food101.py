"""Food-101: 101 dish classes."""

from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class Food101(SplitDataset):
    dataset_dir = "food-101"
    image_subdir = "images"
    split_file = "split_zhou_Food101.json"
    anchor = "food101"
    layout = """
food-101/
  images/<class>/<image>.jpg
  split_zhou_Food101.json
"""
