"""Install with ``pip install -e .`` (add ``[test]`` for the test suite), or build a wheel.

The platform is the package ``restore``; the checkout's plugin folders (``trainers/``, ``datasets/``,
``configs/``) are installed as ``restore_plugins.trainers``, ``restore_plugins.datasets`` and
``restore_plugins.configs`` (no top-level ``datasets`` package that would shadow Hugging Face's), and
advertised to :func:`restore.methods.load_plugins` through the entry-point group ``restore.plugins``.
"""

from setuptools import find_packages, setup

PLUGIN_DIRS = {"restore_plugins.trainers": "trainers", "restore_plugins.datasets": "datasets",
               "restore_plugins.configs": "configs"}
PLUGIN_PACKAGES = ["restore_plugins.trainers", "restore_plugins.trainers.craft", "restore_plugins.datasets",
                   "restore_plugins.configs"]

setup(
    name="restore-prompt",
    version="0.1.0",
    description="Prompt learning for CLIP: RESTORE, MMRL, Craft and the CoOp-family baselines",
    packages=find_packages(include=["restore", "restore.*"]) + PLUGIN_PACKAGES,
    package_dir=PLUGIN_DIRS,
    package_data={"restore": ["py.typed", "evaluation/published/*.csv"],
                  "restore_plugins.configs": ["datasets/*.yaml", "trainers/*/*.yaml", "trainers/*/*/*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.5,<=2.14.1",  # 2.5: torch.serialization.safe_globals (safe checkpoint loading)
        "torchvision>=0.20,<=0.29.1",  # the torchvision of torch 2.5
        "open_clip_torch>=2.20",
        "yacs>=0.1.8",
        "numpy",
        "scipy",  # Stanford Cars' and Flowers' .mat annotations
        "PyYAML",
        "Pillow",
        "tqdm",
        "matplotlib",
        "ftfy",
        "regex",
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3.5", "submitit>=1.5", "ruff>=0.17,<0.18", "mypy>=2.4,<2.5"], "cluster": ["submitit>=1.5"]},
    entry_points={"console_scripts": ["restore-dassl-alias=restore.dassl_alias:main"],
                  "restore.plugins": ["trainers = restore_plugins.trainers:register_all", "datasets = restore_plugins.datasets"]},
)
