"""Oxford Flowers-102: 102 flower species."""

import json
import os.path as osp
from collections import defaultdict

from restore.engine.data import split_per_class
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class OxfordFlowers(SplitDataset):
    dataset_dir = "oxford_flowers"
    image_subdir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    anchor = "oxford_flowers"
    layout = """
oxford_flowers/
  jpg/image_00001.jpg ...
  imagelabels.mat, cat_to_name.json   (only without the JSON)
  split_zhou_OxfordFlowers.json
"""

    def build_split(self):
        """From ``imagelabels.mat`` (1..102) and ``cat_to_name.json``: 50/20/30% per class."""
        from scipy.io import loadmat

        label_file = osp.join(self.dataset_dir, "imagelabels.mat")
        names_file = osp.join(self.dataset_dir, "cat_to_name.json")
        self.require(label_file, names_file, what=f"neither {self.split_file} nor the raw label files exist")
        with open(names_file, "r") as f:
            lab2cname = json.load(f)
        tracker = defaultdict(list)
        for i, label in enumerate(loadmat(label_file)["labels"][0]):
            tracker[int(label)].append(osp.join(self.image_dir, f"image_{str(i + 1).zfill(5)}.jpg"))
        per_class = ((label - 1, lab2cname[str(label)], impaths) for label, impaths in tracker.items())
        return split_per_class(per_class, 0.5, 0.2, where=self.image_dir)
