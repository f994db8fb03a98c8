"""UCF101 (middle frames): 101 human actions."""

import os.path as osp
import re

from restore.engine.data import make_datums, split_trainval
from restore.engine.data.split_datasets import SplitDataset
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class UCF101(SplitDataset):
    dataset_dir = "ucf101"
    image_subdir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    anchor = "ucf101"
    layout = """
ucf101/
  UCF-101-midframes/<Action_Name>/v_<Action>_gXX_cYY.jpg
  ucfTrainTestlist/{classInd.txt,trainlist01.txt,testlist01.txt}   (only without the JSON)
  split_zhou_UCF101.json
"""

    def build_split(self):
        """From split 01 of ucfTrainTestlist; CamelCase actions become ``Words_Joined_Like_This``."""
        cname2lab = {}
        for line in self.read_lines("ucfTrainTestlist/classInd.txt", "ucfTrainTestlist/classInd.txt"):
            label, classname = line.split(" ")
            cname2lab[classname] = int(label) - 1
        trainval = self.read_data(cname2lab, "ucfTrainTestlist/trainlist01.txt")
        test = self.read_data(cname2lab, "ucfTrainTestlist/testlist01.txt")
        train, val = split_trainval(trainval)
        return train, val, test

    def read_data(self, cname2lab, text_file):
        items = []
        for line in self.read_lines(text_file, text_file):
            action, filename = line.split(" ")[0].split("/")
            renamed = "_".join(re.findall("[A-Z][^A-Z]*", action))
            impath = osp.join(self.image_dir, renamed, filename.replace(".avi", ".jpg"))
            items.append((impath, cname2lab[action], renamed))
        return make_datums(items, text_file, self.see)
