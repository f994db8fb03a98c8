"""Hand-written prompt templates per dataset (CoOp's ZeroshotCLIP table, used by MMRL and Craft too)."""

from __future__ import annotations

# ``{}`` takes the class name with "_" replaced by a space.
CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# The 7-template ensemble of CoOp's ZeroshotCLIP2 (which adds the dataset's custom template).
IMAGENET_TEMPLATES_SELECT: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def dataset_template(dataset_name: str) -> str:
    """The dataset's hand-written template (``"{} texture."`` for DTD); unknown datasets -> 'a photo of a {}.'."""
    return CUSTOM_TEMPLATES.get(dataset_name, "a photo of a {}.")


def template_for(dataset_name: str, classname: str) -> str:
    """The dataset's hand-written prompt for ``classname`` (``_`` -> space)."""
    return dataset_template(dataset_name).format(classname.replace("_", " "))
