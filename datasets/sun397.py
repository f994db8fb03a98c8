"""SUN397: 397 scene categories."""

import os.path as osp

from restore.engine.data import make_datums, split_trainval
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class SUN397(SplitDataset):
    dataset_dir = "sun397"
    image_subdir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    anchor = "sun397"
    layout = """
sun397/
  SUN397/<letter>/<class>[/<subclass>]/sun_<id>.jpg
  ClassName.txt, Training_01.txt, Testing_01.txt   (only without the JSON)
  split_zhou_SUN397.json
"""

    def build_split(self):
        """From the official partition 01; class name = path words after the letter, reversed."""
        classnames = [line[1:] for line in self.read_lines("ClassName.txt", "ClassName.txt")]
        cname2lab = {c: i for i, c in enumerate(classnames)}
        trainval = self.read_data(cname2lab, "Training_01.txt")
        test = self.read_data(cname2lab, "Testing_01.txt")
        train, val = split_trainval(trainval)
        return train, val, test

    def read_data(self, cname2lab, text_file):
        items = []
        for line in self.read_lines(text_file, text_file):
            imname = line[1:]  # drop the leading "/"
            classname = osp.dirname(imname)
            label = cname2lab[classname]
            words = classname.split("/")[1:][::-1]  # drop the letter; "outdoor"/"indoor" first
            items.append((osp.join(self.image_dir, imname), label, " ".join(words)))
        return make_datums(items, text_file, self.see)
