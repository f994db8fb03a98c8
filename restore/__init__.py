"""RESTORE: prompt learning for CLIP-style vision-language models.

The package is the platform (engine, CLIP loading, prompted encoders, evaluation, analysis);
methods live in ``trainers/`` and benchmark loaders in ``datasets/`` at the repository root.
"""

__version__ = "0.1.0"
