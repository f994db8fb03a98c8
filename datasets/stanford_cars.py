"""Stanford Cars: 196 make/model/year classes."""

import os.path as osp

from restore.engine.data import make_datums, split_trainval
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class StanfordCars(SplitDataset):
    dataset_dir = "stanford_cars"
    image_subdir = ""  # the JSON paths are relative to stanford_cars/ itself (cars_train/..., cars_test/...)
    split_file = "split_zhou_StanfordCars.json"
    anchor = "stanford_cars"
    layout = """
stanford_cars/
  cars_train/00001.jpg ...   cars_test/00001.jpg ...
  devkit/{cars_train_annos.mat,cars_meta.mat}, cars_test_annos_withlabels.mat   (only without the JSON)
  split_zhou_StanfordCars.json
"""

    def build_split(self):
        """From the MATLAB annotations (needs scipy); the year moves to the front of the class name."""
        meta = osp.join(self.dataset_dir, "devkit", "cars_meta.mat")
        trainval = self.read_data("cars_train", osp.join("devkit", "cars_train_annos.mat"), meta)
        test = self.read_data("cars_test", "cars_test_annos_withlabels.mat", meta)
        train, val = split_trainval(trainval)
        return train, val, test

    def read_data(self, image_dir: str, anno_file: str, meta_file: str):
        from scipy.io import loadmat

        anno_path = osp.join(self.dataset_dir, anno_file)
        self.require(anno_path, meta_file, what=f"neither {self.split_file} nor the raw .mat annotations exist")
        annos = loadmat(anno_path)["annotations"][0]
        names = loadmat(meta_file)["class_names"][0]
        items = []
        for anno in annos:
            label = int(anno["class"][0, 0]) - 1
            words = str(names[label][0]).split(" ")
            words.insert(0, words.pop(-1))
            items.append((osp.join(self.dataset_dir, image_dir, str(anno["fname"][0])), label, " ".join(words)))
        return make_datums(items, anno_path, self.see)
