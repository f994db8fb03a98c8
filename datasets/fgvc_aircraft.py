"""FGVC-Aircraft (2013b): 100 aircraft variants, official train/val/test split."""

import os.path as osp

from restore.engine.data import make_datums
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class FGVCAircraft(SplitDataset):
    dataset_dir = "fgvc_aircraft"
    image_subdir = "images"
    split_file = ""  # no JSON: the official images_variant_*.txt files are the split
    anchor = "fgvc_aircraft"
    layout = """
fgvc_aircraft/            (the data/ folder of fgvc-aircraft-2013b, renamed)
  images/<id>.jpg
  images_variant_{train,val,test}.txt
  variants.txt
"""

    def load_splits(self, cfg):
        """Labels follow the line order of ``variants.txt``; each split line is ``<id> <variant>``."""
        classnames = self.read_lines("variants.txt", "variants.txt")
        cname2lab = {c: i for i, c in enumerate(classnames)}
        return tuple(self.read_data(cname2lab, f"images_variant_{s}.txt") for s in ("train", "val", "test"))

    def read_data(self, cname2lab, split_file):
        items = []
        for line in self.read_lines(split_file, split_file):
            parts = line.split(" ")
            classname = " ".join(parts[1:])
            if classname not in cname2lab:
                raise self.error(f"variant {classname!r} in {split_file} is not listed in variants.txt",
                                 osp.join(self.dataset_dir, split_file))
            items.append((osp.join(self.image_dir, parts[0] + ".jpg"), cname2lab[classname], classname))
        return make_datums(items, osp.join(self.dataset_dir, split_file), self.see)
