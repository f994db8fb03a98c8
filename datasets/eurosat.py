"""EuroSAT (RGB): 10 land-cover classes of Sentinel-2 patches."""

from restore.engine.data.benchmark import SplitDataset
from restore.engine.registry import DATASET_REGISTRY

NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


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
