"""Registered trainers; importing this package registers every method."""

from . import coop, zsclip  # noqa: F401
