"""Facts about the 15 benchmarks shared by the loaders (``datasets/``) and the data tools."""

from __future__ import annotations

# yaml name (configs/datasets/<name>.yaml, DATASETS.md section) -> (DATASET.NAME, folder under ROOT)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "imagenet": ("ImageNet", "imagenet"),
    "caltech101": ("Caltech101", "caltech-101"),
    "oxford_pets": ("OxfordPets", "oxford_pets"),
    "stanford_cars": ("StanfordCars", "stanford_cars"),
    "oxford_flowers": ("OxfordFlowers", "oxford_flowers"),
    "food101": ("Food101", "food-101"),
    "fgvc_aircraft": ("FGVCAircraft", "fgvc_aircraft"),
    "sun397": ("SUN397", "sun397"),
    "dtd": ("DescribableTextures", "dtd"),
    "eurosat": ("EuroSAT", "eurosat"),
    "ucf101": ("UCF101", "ucf101"),
    "imagenetv2": ("ImageNetV2", "imagenetv2"),
    "imagenet_sketch": ("ImageNetSketch", "imagenet-sketch"),
    "imagenet_a": ("ImageNetA", "imagenet-adversarial"),
    "imagenet_r": ("ImageNetR", "imagenet-rendition"),
}

EUROSAT_NEW_CNAMES: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

CALTECH101_IGNORED: tuple[str, ...] = ("BACKGROUND_Google", "Faces_easy")
CALTECH101_NEW_CNAMES: dict[str, str] = {
    "airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike",
}


def resolve(name: str) -> str:
    """The yaml name for a yaml or class name (case-insensitive); unknown -> ValueError naming the closest one."""
    for key, (cls, _) in BENCHMARKS.items():
        if name.lower() in (key, cls.lower()):
            return key
    from restore.engine.registry import closest_names  # lazy: the engine package is heavier than this table

    by_name = {alias: key for key, (cls, _) in BENCHMARKS.items() for alias in (key, cls)}
    hint = closest_names(name, by_name)
    suggestion = f" Did you mean {by_name[hint[0]]!r}?" if hint else ""
    raise ValueError(f"Unknown dataset {name!r}.{suggestion} Choose one of {sorted(BENCHMARKS)}.")
