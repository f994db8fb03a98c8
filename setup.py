"""Install with ``pip install -e .`` (add ``[test]`` for the test suite)."""

from setuptools import find_packages, setup

setup(
    name="restore-prompt",
    version="0.1.0",
    description="Prompt learning for CLIP: RESTORE, MMRL, Craft and the CoOp-family baselines",
    packages=find_packages(include=["restore", "restore.*"]),
    package_data={"restore": ["py.typed", "evaluation/published/*.csv"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "torchvision>=0.16,<=0.29.1",
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
    extras_require={"test": ["pytest>=7", "submitit>=1.5"], "cluster": ["submitit>=1.5"]},
    entry_points={"console_scripts": ["restore-dassl-alias=restore.dassl_alias:main"]},
)
