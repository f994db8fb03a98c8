"""CelebA for group robustness: target ``Blond_Hair``, spurious attribute ``Male``, 4 groups.

Two layouts: the original release ``celeba/`` (``list_attr_celeba.txt``, ``list_eval_partition.txt``,
``img_align_celeba/``; torchvision's folder) and the WILDS package's ``celebA_v1.0/``
(``list_attr_celeba.csv``, ``list_eval_partition.csv``, ``img_align_celeba/``). Attribute values are
-1/1 (0/1 accepted); partitions 0 train, 1 val, 2 test.
"""

import os.path as osp

from restore.engine.data.group_dataset import GroupDataset, read_csv_table
from restore.engine.registry import DATASET_REGISTRY

TARGET = "Blond_Hair"
SPURIOUS = "Male"


@DATASET_REGISTRY.register()
class CelebA(GroupDataset):
    dataset_dir = "celeba"
    layouts = ("celeba", "celebA_v1.0")
    anchor = "celeba"
    default_classnames = ("person with non-blond hair", "person with blond hair")
    default_attribute_names = ("female", "male")
    layout = """
celeba/                      (original release)      or  celebA_v1.0/   (WILDS)
  list_attr_celeba.txt                                    list_attr_celeba.csv
  list_eval_partition.txt                                 list_eval_partition.csv
  img_align_celeba/<id>.jpg                               img_align_celeba/<id>.jpg
"""

    def read_rows(self, layout):
        wilds = osp.isfile(osp.join(self.dataset_dir, "list_attr_celeba.csv"))
        ext = "csv" if wilds else "txt"
        attr_path = self.read_file(f"list_attr_celeba.{ext}")
        part_path = self.read_file(f"list_eval_partition.{ext}")
        self.metadata_name = osp.basename(attr_path)
        attrs = self._read_attrs(attr_path, wilds)
        partitions = self._read_partitions(part_path, wilds)
        rows = []
        for line, (image, (blond, male)) in enumerate(attrs.items(), start=2 if wilds else 3):
            if image not in partitions:
                raise self.error(f"image {image} of {osp.basename(attr_path)} has no partition in "
                                 f"{osp.basename(part_path)}", part_path)
            label = self.int_value(str((int(blond) + 1) // 2 if blond in ("-1", "1") else blond), "y", line,
                                   attr_path, (0, 1))
            attribute = self.int_value(str((int(male) + 1) // 2 if male in ("-1", "1") else male), SPURIOUS, line,
                                       attr_path, (0, 1))
            split = partitions[image]
            rows.append((osp.join("img_align_celeba", image), label, attribute, split))
        if not rows:
            raise self.error(f"{osp.basename(attr_path)} lists no images", attr_path)
        return rows

    def _read_attrs(self, path, wilds):
        if wilds:
            table = read_csv_table(path, ("image_id", TARGET, SPURIOUS), self)
            return {row["image_id"]: (row[TARGET], row[SPURIOUS]) for row in table}
        with open(path) as f:
            lines = [line.split() for line in f if line.strip()]
        if len(lines) < 2:
            raise self.error(f"{osp.basename(path)} is truncated (expected a count line, then the attribute names)",
                             path)
        names = lines[1]
        missing = [c for c in (TARGET, SPURIOUS) if c not in names]
        if missing:
            raise self.error(f"{osp.basename(path)} has no column {', '.join(map(repr, missing))}", path)
        ti, si = names.index(TARGET) + 1, names.index(SPURIOUS) + 1
        out = {}
        for number, parts in enumerate(lines[2:], start=3):
            if len(parts) != len(names) + 1:
                raise self.error(f"line {number} of {osp.basename(path)} has {len(parts) - 1} values for "
                                 f"{len(names)} attributes", path)
            out[parts[0]] = (parts[ti], parts[si])
        return out

    def _read_partitions(self, path, wilds):
        if wilds:
            table = read_csv_table(path, ("image_id", "partition"), self)
            items = [(i + 2, row["image_id"], row["partition"]) for i, row in enumerate(table)]
        else:
            with open(path) as f:
                items = [(i + 1, *line.split()[:2]) for i, line in enumerate(f) if line.strip()]
        return {image: self.int_value(value, "partition", line, path, (0, 1, 2)) for line, image, value in items}

    @property
    def see(self):
        return "See DATASETS.md#celeba"
