"""EuroSAT (RGB): 10 land-cover classes of Sentinel-2 patches."""

from restore.datasets.catalog import EUROSAT_NEW_CNAMES as NEW_CNAMES
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class EuroSAT(SplitDataset):
    dataset_dir = "eurosat"
    image_subdir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    anchor = "eurosat"
    new_cnames = NEW_CNAMES
    layout = """
eurosat/
  2750/<Class>/<Class>_1.jpg
  split_zhou_EuroSAT.json
"""
