"""Craft's static image anchors: per-class k-means centroids of frozen CLIP image features.

With one cluster per class (the official code) the anchors are the class means of the frozen,
un-prompted CLIP image features (unnormalised; they are L2-normalised where used) of up to
``ANCHOR_NUM_SHOTS`` training images per class, read with the test transform. Only the classes the
run trains on are used (``DATASET.SUBSAMPLE_CLASSES`` of the run: the base classes in base-to-novel),
so anchor row ``c * K + k`` belongs to label ``c``.

The anchors are cached next to the run (``<OUTPUT_DIR>/craft_anchors.pt``, or
``TRAINER.CRAFT.ANCHOR_PATH``), written atomically and loadable with ``weights_only=True``, with
every setting that determines them (checked before a cache is reused). Compute
them ahead of training with the same arguments as ``train.py`` (run from the repository root)::

    python -m trainers.craft.anchors --root $DATA --trainer MaPLe \\
        --dataset-config-file configs/datasets/dtd.yaml \\
        --config-file configs/trainers/Craft/maple_vit_b16_c2_ep5_batch4_2ctx.yaml \\
        --output-dir output/base2new/train_base/dtd/.../seed1 DATASET.SUBSAMPLE_CLASSES base

or let the regularizer compute them the first time it is used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import os.path as osp
import random
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

import torch

from restore.engine.serialization import safe_torch_load
from restore.engine.utils import atomic_torch_save

from .config import craft_node

ANCHOR_FILE = "craft_anchors.pt"
FORMAT_VERSION = 1
STALE_SUFFIX = ".stale"  # a cached file that no longer fits the run is kept under this suffix

__all__ = ["ANCHOR_FILE", "STALE_SUFFIX", "anchor_path", "sample_per_class", "kmeans", "class_centroids",
           "compute_anchors", "save_anchors", "load_anchors", "anchor_settings", "anchors_match", "ensure_anchors",
           "preserved_rng", "main"]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing the global random / numpy / torch RNG states of the run."""
    from restore.engine.trainer import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def anchor_path(cfg: Any) -> str:
    """``TRAINER.CRAFT.ANCHOR_PATH`` or ``<OUTPUT_DIR>/craft_anchors.pt``."""
    node = craft_node(cfg)
    explicit = str(node.ANCHOR_PATH) if node is not None else ""
    return osp.abspath(osp.expanduser(explicit)) if explicit else osp.abspath(osp.join(cfg.OUTPUT_DIR, ANCHOR_FILE))


def sample_per_class(items: Sequence[Any], shots: int, seed: int) -> list[Any]:
    """Up to ``shots`` items per label (all when ``shots < 1``), drawn with a private seeded RNG."""
    if shots < 1:
        return list(items)
    rng = random.Random(seed)
    by_label: "OrderedDict[int, list[Any]]" = OrderedDict()
    for item in items:
        by_label.setdefault(int(item.label), []).append(item)
    out: list[Any] = []
    for label in sorted(by_label):
        group = by_label[label]
        out.extend(group if len(group) <= shots else rng.sample(group, shots))
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Euclidean k-means (k-means++ init, Lloyd iterations) of ``x`` (N, D) -> centroids (k, D).

    ``k = 1`` returns the mean exactly. With ``N <= k`` the points themselves are the centroids,
    repeated cyclically up to ``k`` rows. Deterministic for a given ``seed``.
    """
    x = x.double()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means of an empty set")
    if k == 1:
        return x.mean(dim=0, keepdim=True)
    if n <= k:
        return x[torch.arange(k) % n].clone()
    gen = torch.Generator().manual_seed(int(seed))
    centroids = [x[int(torch.randint(n, (1,), generator=gen))]]
    d2 = ((x - centroids[0]) ** 2).sum(dim=1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(dim=1))
    c = torch.stack(centroids)
    assign = None
    for _ in range(max(1, iters)):
        dist = torch.cdist(x, c)
        new_assign = dist.argmin(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(dim=0)
            else:  # empty cluster: move it to the point farthest from its centroid
                far = int(dist.gather(1, assign[:, None]).squeeze(1).argmax())
                c[j] = x[far]
    return c


def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int, clusters: int = 1,
                    iters: int = 100, seed: int = 1) -> torch.Tensor:
    """Class-major anchors (num_classes * clusters, D): k-means of each class's features."""
    rows = []
    for c in range(num_classes):
        members = features[labels == c]
        if len(members) == 0:
            raise ValueError(f"No anchor image for class {c}: every trained class needs training images")
        rows.append(kmeans(members, clusters, iters=iters, seed=seed + c))
    return torch.cat(rows, dim=0).float()


def _anchor_cfg(cfg: Any) -> Any:
    """The run's dataset settings with every training image (the per-class sample is drawn here)."""
    acfg = cfg.clone()
    acfg.defrost()
    acfg.DATASET.NUM_SHOTS = -1
    acfg.freeze()
    return acfg


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], loader: Any, device: torch.device,
                     autocast_dtype: torch.dtype | None = None, log_every: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encode`` over a loader: (features float32 on CPU, labels)."""
    feats, labels = [], []
    for i, batch in enumerate(loader):
        image = batch["img"].to(device)
        ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            feats.append(encode(image).float().cpu())
        labels.append(batch["label"].long())
        if log_every and (i + 1) % log_every == 0:
            print(f"Craft anchors: encoded {i + 1}/{len(loader)} batches", flush=True)
    return torch.cat(feats), torch.cat(labels)


def compute_anchors(cfg: Any, clip_model: Any, device: torch.device | str | None = None,
                    autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Static image anchors of the run described by ``cfg`` with the frozen ``clip_model``.

    Returns a weights-only-serialisable dict: ``anchors`` (C*K, D) float32 (unnormalised),
    ``labels`` (C*K,), ``classnames``, ``counts`` (images per class), and the settings used.
    The global RNG states are left unchanged.
    """
    from restore.engine.data import build_data_loader, build_dataset, build_transform

    node = craft_node(cfg)
    if node is None:
        raise ValueError("cfg has no TRAINER.CRAFT node: call restore.engine.config.extend_cfg(cfg) after "
                         "importing trainers.craft")
    device = torch.device(device) if device is not None else torch.device("cpu")
    acfg = _anchor_cfg(cfg)
    with preserved_rng():
        dataset = build_dataset(acfg)
        items = sample_per_class(dataset.train_x, int(node.ANCHOR_NUM_SHOTS), int(node.ANCHOR_SEED))
        tfm = build_transform(acfg, is_train=node.ANCHOR_TRANSFORM == "train")
        loader = build_data_loader(acfg, sampler_type="SequentialSampler", data_source=items,
                                   batch_size=int(node.ANCHOR_BATCH_SIZE), tfm=tfm, is_train=False, shard=False)
        start = time.time()
        feats, labels = extract_features(clip_model.encode_image, loader, device, autocast_dtype)
        num_classes = len(dataset.classnames)
        clusters = int(node.ANCHOR_CLUSTERS)
        anchors = class_centroids(feats, labels, num_classes, clusters, int(node.ANCHOR_KMEANS_ITERS),
                                  int(node.ANCHOR_SEED))
    counts = torch.bincount(labels, minlength=num_classes)
    print(f"Craft anchors: {num_classes} classes x {clusters} cluster(s) from {len(items):,} images "
          f"({time.time() - start:.1f}s)", flush=True)
    return {
        "version": FORMAT_VERSION,
        "anchors": anchors,
        "labels": torch.arange(num_classes).repeat_interleave(clusters),
        "classnames": list(dataset.classnames),
        "counts": counts,
        "clusters": clusters,
        **anchor_settings(cfg),
    }


def save_anchors(data: dict[str, Any], path: str) -> str:
    """Write the anchor dict atomically (temporary file + rename)."""
    atomic_torch_save(data, path)
    return path


def load_anchors(path: str) -> dict[str, Any]:
    """Load an anchor file with ``weights_only=True``; a corrupted or foreign file is a one-sentence ValueError."""
    advice = "delete it (anchors missing at their path are computed again)"
    return safe_torch_load(path, what="a Craft anchor file", expected="a Craft anchor file",
                           corrupted_advice=advice, refused_advice=advice, error=ValueError)


def _shots(value: Any) -> int:
    """ANCHOR_NUM_SHOTS as a sample size: every value < 1 means all images (-1)."""
    return int(value) if int(value) >= 1 else -1


# Recorded settings that determine the anchors besides classes / backbone / K:
# file key -> (config key, type stored in the file, normaliser for the comparison).
_SETTINGS: dict[str, tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "dataset": ("DATASET.NAME", str, str),
    "subsample": ("DATASET.SUBSAMPLE_CLASSES", str, str),
    "num_shots": ("TRAINER.CRAFT.ANCHOR_NUM_SHOTS", int, _shots),
    "seed": ("TRAINER.CRAFT.ANCHOR_SEED", int, int),
    "transform": ("TRAINER.CRAFT.ANCHOR_TRANSFORM", str, str),
    "kmeans_iters": ("TRAINER.CRAFT.ANCHOR_KMEANS_ITERS", int, int),
}


def anchor_settings(cfg: Any) -> dict[str, Any]:
    """The settings of ``cfg`` that determine its anchors, as recorded in an anchor file (with the backbone)."""
    def value(dotted: str) -> Any:
        return functools.reduce(lambda node, key: node[key], dotted.split("."), cfg)

    return {"backbone": str(cfg.MODEL.BACKBONE.NAME),
            **{key: stored(value(cfg_key)) for key, (cfg_key, stored, _) in _SETTINGS.items()}}


def anchors_match(data: dict[str, Any], classnames: Sequence[str], backbone: str, clusters: int,
                  settings: dict[str, Any] | None = None) -> str:
    """Why a cached anchor file does not fit this run ("" when it does).

    Compares the format version, the class names, the backbone, K and, given the run's ``settings``
    (:func:`anchor_settings`), every other recorded setting that determines the anchors: dataset,
    SUBSAMPLE_CLASSES, ANCHOR_NUM_SHOTS, ANCHOR_SEED, ANCHOR_TRANSFORM and ANCHOR_KMEANS_ITERS (the
    last only with K > 1; the seed with K = 1 only when a per-class sample is drawn). A setting the
    file does not record (a hand-made file) is not compared. Every differing setting is named.
    """
    if data.get("version") != FORMAT_VERSION:
        return f"format version {data.get('version')!r} != {FORMAT_VERSION}"
    why = []
    if list(data.get("classnames", [])) != list(classnames):
        why.append(f"its {len(data.get('classnames', []))} classes differ from the run's {len(classnames)} "
                   "(another dataset or SUBSAMPLE_CLASSES?)")
    if data.get("backbone") != backbone:
        why.append(f"backbone {data.get('backbone')!r} != {backbone!r}")
    if int(data.get("clusters", -1)) != clusters:
        why.append(f"ANCHOR_CLUSTERS {data.get('clusters')} != {clusters}")
    for key, (cfg_key, _, norm) in _SETTINGS.items():
        if settings is None or key not in settings or key not in data:
            continue
        if key == "kmeans_iters" and clusters == 1:
            continue  # K = 1 is the exact mean: no iterations
        if key == "seed" and clusters == 1 and _shots(settings.get("num_shots", 0)) == -1 \
                and _shots(data.get("num_shots", 0)) == -1:
            continue  # every image, exact mean: the seed draws nothing
        if norm(data[key]) != norm(settings[key]):
            why.append(f"{cfg_key} {data[key]!r} != {settings[key]!r}")
    return "; ".join(why)


def ensure_anchors(cfg: Any, clip_model: Any, classnames: Sequence[str], device: torch.device | str | None = None,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Load the cached anchors of this run, or compute and cache them (with a log line).

    A cache at the default path that does not fit the run (:func:`anchors_match`: other classes,
    backbone, K, dataset, SUBSAMPLE_CLASSES, ANCHOR_NUM_SHOTS, ANCHOR_SEED, ANCHOR_TRANSFORM or
    ANCHOR_KMEANS_ITERS; the log names each) is recomputed, the replaced file being kept as
    ``<path>.stale``; one given explicitly in ``ANCHOR_PATH`` raises a ValueError instead.
    Under DDP rank 0 alone loads or computes (over all anchor images) and writes the file; the
    other ranks wait for it and load it, so every rank holds the same anchors.
    """
    from restore.engine import distributed

    if distributed.is_distributed():
        data = (ensure_anchors_here(cfg, clip_model, classnames, device, autocast_dtype)
                if distributed.is_main_process() else None)
        distributed.barrier()
        return data if data is not None else load_anchors(anchor_path(cfg))
    return ensure_anchors_here(cfg, clip_model, classnames, device, autocast_dtype)


def ensure_anchors_here(cfg: Any, clip_model: Any, classnames: Sequence[str], device: torch.device | str | None = None,
                        autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """:func:`ensure_anchors` in this process alone."""
    node = craft_node(cfg)
    path = anchor_path(cfg)
    explicit = bool(node is not None and node.ANCHOR_PATH)
    backbone, clusters = str(cfg.MODEL.BACKBONE.NAME), int(node.ANCHOR_CLUSTERS)
    settings = anchor_settings(cfg)
    stale = False
    if osp.isfile(path):
        data = load_anchors(path)
        why = anchors_match(data, classnames, backbone, clusters, settings)
        if not why:
            print(f"Craft: loaded static image anchors {tuple(data['anchors'].shape)} from {path}", flush=True)
            return data
        if explicit:
            raise ValueError(f"TRAINER.CRAFT.ANCHOR_PATH {path} does not fit this run: {why}. Recompute it with "
                             "`python -m trainers.craft.anchors` and the run's arguments, or clear ANCHOR_PATH.")
        print(f"Craft: cached anchors {path} do not fit this run ({why}); recomputing", flush=True)
        stale = True
    else:
        print(f"Craft: static image anchors not found at {path}; computing them now", flush=True)
    data = compute_anchors(cfg, clip_model, device, autocast_dtype)
    why = anchors_match(data, classnames, backbone, clusters, settings)
    if why:
        raise ValueError(f"Craft anchors computed from {cfg.DATASET.NAME} do not match the trainer's classes: {why}")
    if stale:  # keep the replaced file (one generation) rather than overwrite it
        os.replace(path, path + STALE_SUFFIX)
        print(f"Craft: kept the replaced anchors as {path + STALE_SUFFIX}", flush=True)
    save_anchors(data, path)
    print(f"Craft: saved static image anchors {tuple(data['anchors'].shape)} to {path}", flush=True)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``train.py``'s arguments -> compute the run's anchors and write them (see module docstring)."""
    from restore import launch as train_entry
    from restore.clip import load_clip
    from restore.engine.config import ConfigError
    from restore.engine.utils import error_message, set_random_seed

    parser = train_entry.build_parser()
    parser.description = "Compute Craft's static image anchors of a run (same arguments as train.py)."
    parser.add_argument("--force", action="store_true", help="recompute even when a matching file exists")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    args = parser.parse_args(argv)
    try:
        cfg = train_entry.setup_cfg(args)
    except (ConfigError, ValueError, KeyError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2
    if cfg.SEED >= 0:
        set_random_seed(cfg.SEED)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.USE_CUDA and not args.cpu else "cpu")
    clip_model = load_clip(cfg.MODEL.BACKBONE.NAME, device=device,
                           cache_dir=cfg.MODEL.BACKBONE.CACHE_DIR or None).model
    from restore.prompting.trainer import autocast_dtype as working_dtype

    autocast_dtype = working_dtype("auto", device)
    path = anchor_path(cfg)
    if args.force or not osp.isfile(path):
        data = compute_anchors(cfg, clip_model, device, autocast_dtype)
        save_anchors(data, path)
        print(f"Craft: saved static image anchors {tuple(data['anchors'].shape)} to {path}")
        return 0
    from restore.engine.data import build_dataset

    classnames = build_dataset(_anchor_cfg(cfg)).classnames
    ensure_anchors(cfg, clip_model, classnames, device, autocast_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
