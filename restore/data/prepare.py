"""Download, verify and extract the benchmarks that have stable public archives; explain the rest.

    python -m restore.data.prepare dtd --root $DATA
    python -m restore.data.prepare dtd --root $DATA --mirror http://my.mirror/archives   # same file names

Archives are streamed to ``<root>/.downloads/<file>.part`` while their SHA256 is computed; a file
whose hash differs from the expected one is deleted and nothing is extracted. Where no hash is
recorded the download is reported as unverified. The mirror base may also come from the
``RESTORE_DATA_MIRROR`` environment variable. Split JSON files (CoOp's Google Drive links) and
datasets without stable public archives are described in DATASETS.md and printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import os.path as osp
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from restore.clip.loader import sha256_file

from .benchmarks import BENCHMARKS, resolve

__all__ = ["Source", "Recipe", "RECIPES", "ChecksumError", "DownloadError", "download", "extract", "prepare", "main"]

MIRROR_ENV = "RESTORE_DATA_MIRROR"
_VGG = "https://www.robots.ox.ac.uk/~vgg/data"


class ChecksumError(ValueError):
    """A downloaded file whose SHA256 differs from the recorded one (the file was deleted)."""


@dataclass(frozen=True)
class Source:
    """One downloadable file: its name (also the name on a mirror), URL, SHA256 and where it goes."""

    filename: str
    url: str
    sha256: str | None = None
    extract_to: str = ""  # folder under ROOT to extract into; plain files are copied there
    inner: tuple[str, ...] = ()  # archives inside the extracted tree (relative to extract_to) to extract in place


@dataclass(frozen=True)
class Recipe:
    sources: tuple[Source, ...] = ()
    moves: tuple[tuple[str, str], ...] = ()  # (from, to) renames under ROOT after extraction
    manual: str = ""  # what the user still has to fetch by hand
    check: tuple[str, ...] = field(default=())  # paths under ROOT that must exist afterwards


_SPLIT_JSON = ("Download {json} from the Google Drive link in CoOp's DATASETS.md "
               "(https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) into $ROOT/{folder}/.")


def _json_note(key: str) -> str:
    cls, folder = BENCHMARKS[key]
    return _SPLIT_JSON.format(json=f"split_zhou_{cls}.json", folder=folder)


RECIPES: dict[str, Recipe] = {
    "dtd": Recipe((Source("dtd-r1.0.1.tar.gz", f"{_VGG}/dtd/download/dtd-r1.0.1.tar.gz"),),
                  manual=_json_note("dtd"), check=("dtd/images",)),
    "oxford_pets": Recipe((Source("images.tar.gz", f"{_VGG}/pets/data/images.tar.gz", extract_to="oxford_pets"),
                           Source("annotations.tar.gz", f"{_VGG}/pets/data/annotations.tar.gz",
                                  extract_to="oxford_pets")),
                          manual=_json_note("oxford_pets"), check=("oxford_pets/images", "oxford_pets/annotations")),
    "oxford_flowers": Recipe((Source("102flowers.tgz", f"{_VGG}/flowers/102/102flowers.tgz", extract_to="oxford_flowers"),
                              Source("imagelabels.mat", f"{_VGG}/flowers/102/imagelabels.mat",
                                     extract_to="oxford_flowers")),
                             manual=_json_note("oxford_flowers") + " Also fetch cat_to_name.json (linked there).",
                             check=("oxford_flowers/jpg",)),
    "food101": Recipe((Source("food-101.tar.gz", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"),),
                      manual=_json_note("food101"), check=("food-101/images",)),
    "fgvc_aircraft": Recipe((Source("fgvc-aircraft-2013b.tar.gz",
                                    f"{_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"),),
                            moves=(("fgvc-aircraft-2013b/data", "fgvc_aircraft"),),
                            check=("fgvc_aircraft/images", "fgvc_aircraft/variants.txt")),
    "eurosat": Recipe((Source("EuroSAT.zip", "http://madm.dfki.de/files/sentinel/EuroSAT.zip", extract_to="eurosat"),),
                      manual=_json_note("eurosat"), check=("eurosat/2750",)),
    "caltech101": Recipe((Source("caltech-101.zip", "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                                 inner=("caltech-101/101_ObjectCategories.tar.gz",)),),
                         manual=_json_note("caltech101"), check=("caltech-101/101_ObjectCategories",)),
    "imagenetv2": Recipe((Source("imagenetv2-matched-frequency.tar.gz",
                                 "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                                 "imagenetv2-matched-frequency.tar.gz", extract_to="imagenetv2"),),
                         manual="Copy imagenet/classnames.txt into $ROOT/imagenetv2/.",
                         check=("imagenetv2/imagenetv2-matched-frequency-format-val",)),
    "imagenet_a": Recipe((Source("imagenet-a.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                                 extract_to="imagenet-adversarial"),),
                         manual="Copy imagenet/classnames.txt into $ROOT/imagenet-adversarial/.",
                         check=("imagenet-adversarial/imagenet-a",)),
    "imagenet_r": Recipe((Source("imagenet-r.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                                 extract_to="imagenet-rendition"),),
                         manual="Copy imagenet/classnames.txt into $ROOT/imagenet-rendition/.",
                         check=("imagenet-rendition/imagenet-r",)),
    "imagenet": Recipe(manual="ImageNet-1k (ILSVRC-2012) needs a login at image-net.org: put train/ and val/ "
                              "(val sorted into wnid folders) under $ROOT/imagenet/images/ and classnames.txt "
                              "(CoOp's DATASETS.md) under $ROOT/imagenet/."),
    "stanford_cars": Recipe(manual="The original Stanford Cars links are dead (CoOp#61): use a re-host (see "
                                   "DATASETS.md#stanford_cars) and " + _json_note("stanford_cars")),
    "sun397": Recipe(manual="The original SUN397 links are dead (CoOp#90): use a re-host (see DATASETS.md#sun397) "
                            "and " + _json_note("sun397")),
    "ucf101": Recipe(manual="UCF-101-midframes.zip is provided by CoOp (Google Drive link in its DATASETS.md): "
                            "extract it into $ROOT/ucf101/ and " + _json_note("ucf101")),
    "imagenet_sketch": Recipe(manual="Download ImageNet-Sketch (github.com/HaohanWang/ImageNet-Sketch), extract "
                                     "its sketch/ folder as $ROOT/imagenet-sketch/images/ and copy "
                                     "imagenet/classnames.txt into $ROOT/imagenet-sketch/."),
}


class DownloadError(OSError):
    """A download that could not be fetched (no network, bad URL); the message says how to do it by hand."""


def download(url: str, dest: str, sha256: str | None = None) -> str:
    """Stream ``url`` to ``dest`` through ``dest.part``; a SHA256 mismatch deletes it and raises ChecksumError.

    An archive already at ``dest`` (fetched by hand, or kept by ``--keep-archives``) is reused when
    its SHA256 matches the recorded one (or when none is recorded).
    """
    os.makedirs(osp.dirname(osp.abspath(dest)), exist_ok=True)
    if osp.isfile(dest):
        got = sha256_file(dest)
        if sha256 is None or got.lower() == sha256.lower():
            print(f"Reusing {dest} (SHA256 {got}" + (" verified)" if sha256 else ", unverified: no recorded hash)"))
            return dest
        print(f"{dest} has SHA256 {got}, expected {sha256}: downloading it again")
    part = dest + ".part"
    digest = hashlib.sha256()
    print(f"Downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        if osp.exists(part):
            os.remove(part)
        if isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError)):
            raise DownloadError(
                f"Could not download {url} ({getattr(err, 'reason', err)}). Without network here: fetch it "
                f"elsewhere and put it at {dest} (it is then reused), or serve the archives and pass --mirror.") from err
        raise
    got = digest.hexdigest()
    if sha256 is not None and got.lower() != sha256.lower():
        os.remove(part)
        raise ChecksumError(f"SHA256 mismatch for {url}: expected {sha256}, got {got}. The partial download was "
                            "removed and nothing was extracted; retry or check the mirror.")
    print(f"SHA256 {got} " + ("verified" if sha256 else "(unverified: no recorded hash)"))
    os.replace(part, dest)
    return dest


def extract(archive: str, dest: str) -> None:
    """Extract a .zip/.tar/.tar.gz/.tgz into ``dest``, refusing members that would land outside it."""
    os.makedirs(dest, exist_ok=True)
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            root = osp.realpath(dest)
            for member in zf.namelist():
                if not osp.realpath(osp.join(dest, member)).startswith(root + os.sep):
                    raise ValueError(f"Refusing to extract {member!r} from {archive}: it points outside {dest}")
            zf.extractall(dest)
    elif archive.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    else:
        shutil.copy2(archive, osp.join(dest, osp.basename(archive)))


def prepare(name: str, root: str, mirror: str | None = None, sha256: Mapping[str, str] | None = None,
            keep_archives: bool = False) -> list[str]:
    """Fetch and lay out dataset ``name`` under ``root``; return the manual steps still needed.

    ``mirror`` replaces each URL's base (the file name is kept); ``sha256`` overrides recorded hashes
    per file name.
    """
    key = resolve(name)
    recipe = RECIPES[key]
    root = osp.abspath(osp.expanduser(root))
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    downloads = osp.join(root, ".downloads")
    for src in recipe.sources:
        url = f"{mirror.rstrip('/')}/{src.filename}" if mirror else src.url
        expected = (sha256 or {}).get(src.filename, src.sha256)
        archive = download(url, osp.join(downloads, src.filename), expected)
        target = osp.join(root, src.extract_to)
        print(f"Extracting {src.filename} into {target}")
        extract(archive, target)
        for inner in src.inner:
            inner_path = osp.join(target, inner)
            extract(inner_path, osp.dirname(inner_path))
            os.remove(inner_path)
        if not keep_archives:
            os.remove(archive)
    for old, new in recipe.moves:
        if osp.exists(osp.join(root, new)):
            raise FileExistsError(f"Cannot move {old} to {new}: {osp.join(root, new)} already exists")
        shutil.move(osp.join(root, old), osp.join(root, new))
    missing = [p for p in recipe.check if not osp.exists(osp.join(root, p))]
    if missing:
        raise FileNotFoundError(f"After extraction {missing} are missing under {root}; see DATASETS.md#{key}")
    steps = [recipe.manual.replace("$ROOT", root)] if recipe.manual else []
    print(f"{BENCHMARKS[key][0]}: " + ("done." if not steps else "remaining step: " + steps[0]))
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download and lay out a benchmark dataset.")
    parser.add_argument("name", help=f"one of {', '.join(BENCHMARKS)}")
    parser.add_argument("--root", required=True, help="DATASET.ROOT")
    parser.add_argument("--mirror", default=None, help=f"base URL serving the same file names (or ${MIRROR_ENV})")
    parser.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX",
                        help="expected SHA256 of a file (overrides the recorded one)")
    parser.add_argument("--keep-archives", action="store_true")
    args = parser.parse_args(argv)
    hashes = dict(item.split("=", 1) for item in args.sha256)
    try:
        prepare(args.name, args.root, mirror=args.mirror, sha256=hashes, keep_archives=args.keep_archives)
    except (DownloadError, ChecksumError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
