"""Data side of the engine: Datum, DatasetBase and split helpers, transforms, samplers, DataManager."""

from .data_manager import DataManager, DatasetWrapper, build_data_loader, build_dataset, format_table
from .dataset_base import (DatasetBase, cache_root, fewshot_cache_path, load_or_create_fewshot, make_datums,
                           read_and_split_data, read_classnames, read_split, save_split, split_per_class,
                           split_trainval, subsample_classes, writable_cache)
from .datum import (DASSL_DATUM_MODULE, CorruptSplitError, DatasetNotFoundError, Datum, DatumUnpickler, MissingImageError,
                    dumps_datum_cache, load_datum_cache)
from .samplers import build_sampler
from .transforms import INTERPOLATION_MODES, build_transform

__all__ = [
    "Datum", "DatasetBase", "DataManager", "DatasetWrapper", "build_data_loader", "build_dataset",
    "build_transform", "build_sampler", "INTERPOLATION_MODES", "read_split", "save_split", "split_trainval",
    "read_and_split_data", "split_per_class", "subsample_classes", "read_classnames", "load_or_create_fewshot",
    "fewshot_cache_path", "cache_root", "make_datums", "CorruptSplitError", "DatasetNotFoundError", "MissingImageError",
    "DatumUnpickler", "dumps_datum_cache", "load_datum_cache", "DASSL_DATUM_MODULE", "format_table",
    "writable_cache",
]
