"""Oxford-IIIT Pets: 37 cat and dog breeds."""

import os.path as osp

from restore.engine.data import make_datums, split_trainval
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class OxfordPets(SplitDataset):
    dataset_dir = "oxford_pets"
    image_subdir = "images"
    split_file = "split_zhou_OxfordPets.json"
    anchor = "oxford_pets"
    layout = """
oxford_pets/
  images/<Breed>_<n>.jpg
  annotations/{trainval.txt,test.txt}   (only without the JSON)
  split_zhou_OxfordPets.json
"""

    def build_split(self):
        """From ``annotations/``: label = class id - 1, class = lower-cased breed; 20% of trainval -> val."""
        trainval = self.read_data("trainval.txt")
        test = self.read_data("test.txt")
        train, val = split_trainval(trainval)
        return train, val, test

    def read_data(self, split_file: str):
        items = []
        for line in self.read_lines(osp.join("annotations", split_file), f"annotations/{split_file}"):
            imname, label = line.split(" ")[:2]
            breed = "_".join(imname.split("_")[:-1]).lower()
            items.append((osp.join(self.image_dir, imname + ".jpg"), int(label) - 1, breed))
        return make_datums(items, split_file, self.see)
