"""ImageNetV2 (matched-frequency): test-only; folders are named by ImageNet label index."""

import os.path as osp

from restore.engine.data import make_datums
from restore.engine.data.split_datasets import ImageFolderTestset
from restore.engine.registry import DATASET_REGISTRY
from restore.engine.utils import listdir_nohidden


@DATASET_REGISTRY.register()
class ImageNetV2(ImageFolderTestset):
    dataset_dir = "imagenetv2"
    image_subdir = "imagenetv2-matched-frequency-format-val"
    anchor = "imagenetv2"
    layout = """
imagenetv2/
  imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg
  classnames.txt   (copy of ImageNet's, in standard wnid order)
"""

    def read_data(self, classnames):
        """Folder ``str(label)`` holds class ``label``, named by the label-th line of classnames.txt."""
        items = []
        for label, classname in enumerate(classnames.values()):
            class_dir = osp.join(self.image_dir, str(label))
            self.require(class_dir, what=f"class folder {label} is missing (one folder per classnames.txt line)")
            items.extend((osp.join(class_dir, im), label, classname) for im in listdir_nohidden(class_dir))
        return make_datums(items, self.image_dir, self.see)
