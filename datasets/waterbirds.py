"""Waterbirds (Sagawa et al. 2020): landbird / waterbird on a land / water background, 4 groups.

Read from ``metadata.csv`` (``img_filename``, ``y`` 0 landbird 1 waterbird, ``split`` 0 train 1 val
2 test, ``place`` 0 land 1 water) in the group-DRO release folder ``waterbird_complete95_forest2water2/``
or the WILDS package's ``waterbirds_v1.0/`` (same columns).
"""

from restore.engine.data.group_dataset import GroupDataset, read_csv_table
from restore.engine.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class Waterbirds(GroupDataset):
    dataset_dir = "waterbird_complete95_forest2water2"
    layouts = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")
    anchor = "waterbirds"
    default_classnames = ("landbird", "waterbird")
    default_attribute_names = ("land background", "water background")
    metadata_name = "metadata.csv"
    layout = """
waterbird_complete95_forest2water2/   (group-DRO release)  or  waterbirds_v1.0/   (WILDS)
  metadata.csv                        img_filename, y, split, place
  <species folder>/<image>.jpg
"""

    def read_rows(self, layout):
        path = self.read_file(self.metadata_name)
        rows = []
        table = read_csv_table(path, ("img_filename", "y", "split", "place"), self)
        for line, row in enumerate(table, start=2):
            label = self.int_value(row["y"], "y", line, path, (0, 1))
            split = self.int_value(row["split"], "split", line, path, (0, 1, 2))
            place = self.int_value(row["place"], "place", line, path, (0, 1))
            rows.append((row["img_filename"], label, place, split))
        if not rows:
            raise self.error(f"{self.metadata_name} lists no images", path)
        return rows
