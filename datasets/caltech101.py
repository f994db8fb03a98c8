"""Caltech-101: 100 object classes (BACKGROUND_Google and Faces_easy are left out)."""

from restore.datasets.catalog import CALTECH101_IGNORED, CALTECH101_NEW_CNAMES
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class Caltech101(SplitDataset):
    dataset_dir = "caltech-101"
    image_subdir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    anchor = "caltech101"
    ignored_classes = CALTECH101_IGNORED
    new_cnames = CALTECH101_NEW_CNAMES
    layout = """
caltech-101/
  101_ObjectCategories/<class>/image_0001.jpg
  split_zhou_Caltech101.json
"""
