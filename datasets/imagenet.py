"""ImageNet (ILSVRC-2012): 1000 classes; the official val set is the test set."""

import os.path as osp

from restore.engine.data import (DatasetBase, dumps_datum_cache, load_datum_cache, load_or_create_fewshot,
                                 read_classnames, subsample_classes, writable_cache)
from restore.engine.data.split_datasets import BenchmarkMixin, read_wnid_folders
from restore.engine.registry import DATASET_REGISTRY
from restore.engine.utils import atomic_write_bytes


@DATASET_REGISTRY.register()
class ImageNet(BenchmarkMixin, DatasetBase):
    dataset_dir = "imagenet"
    image_subdir = "images"
    anchor = "imagenet"
    layout = """
imagenet/
  images/train/<wnid>/*.JPEG   (1000 folders)
  images/val/<wnid>/*.JPEG     (1000 folders: the 50k val images sorted into class folders)
  classnames.txt               (<wnid> <class name> per line)
"""

    def __init__(self, cfg):
        self._setup_paths(cfg)
        self.preprocessed = osp.join(self.dataset_dir, "preprocessed.pkl")
        cached = osp.join(self.cache_dir, "preprocessed.pkl")
        found = [p for p in (self.preprocessed, cached) if osp.isfile(p)]
        if found:
            data = load_datum_cache(found[0])
            train, test = data["train"], data["test"]
        else:
            classnames = self.read_classnames()
            train = self.read_data(classnames, "train")
            test = self.read_data(classnames, "val")  # the val set is used as the test set
            with writable_cache(cached, "the image list cache"):
                atomic_write_bytes(dumps_datum_cache({"train": train, "test": test}), cached)
        self.check_labels(train, osp.join(self.image_dir, "train"))
        self.check_labels(test, osp.join(self.image_dir, "val"))
        train, _ = load_or_create_fewshot(cfg, self.dataset_dir, train, None, cfg.DATASET.NUM_SHOTS, cfg.SEED)
        train, test = subsample_classes(train, test, subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
        super().__init__(train_x=train, val=test, test=test)

    def read_classnames(self):
        path = osp.join(self.dataset_dir, "classnames.txt")
        self.require(path, what="classnames.txt is missing")
        return read_classnames(path)

    def read_data(self, classnames, split_dir):
        split_dir = osp.join(self.image_dir, split_dir)
        self.require(split_dir)
        return read_wnid_folders(split_dir, classnames, self)
