"""Download, verify and extract the benchmarks that have stable public archives; explain the rest.

    python -m restore.datasets.prepare dtd --root $DATA
    python -m restore.datasets.prepare dtd --root $DATA --mirror http://my.mirror/archives   # same file names
    python -m restore.datasets.prepare dtd --root $DATA --sha256 HEX          # check this SHA256 instead

Archives go to ``<root>/.downloads/<file>``. A download is written under a temporary name and renamed
there only when it is complete (as many bytes as the server's Content-Length) and its checksum matches:
the MD5 that torchvision records for the same file, or the SHA256 given with ``--sha256``. A download
cut short is deleted; an archive whose checksum differs, or that fails to extract, is moved aside to
``<file>.corrupt-<YYYYmmdd-HHMMSS>`` and the error names that path. An archive already in
``.downloads/`` (put there by hand, or kept by ``--keep-archives``) is reused when it verifies.
Extraction goes to a hidden folder under the root, which is merged into place only when it is
complete (files already there, such as split JSONs, are kept). Where no checksum is recorded the
download is reported as unverified with its SHA256. The mirror base may also come from the
``RESTORE_DATA_MIRROR`` environment variable. Split JSON files (CoOp's Google Drive links) and
datasets without stable public archives are described in DATASETS.md and printed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import lzma
import os
import os.path as osp
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from torchvision.datasets.utils import calculate_md5

from restore.clip.loader import sha256_file
from restore.protocols import move_aside

from .catalog import BENCHMARKS, resolve

__all__ = ["Source", "Recipe", "RECIPES", "PrepareError", "ChecksumError", "DownloadError", "ExtractError",
           "CORRUPT_SUFFIX", "download", "extract", "prepare", "sha256_overrides", "main"]

MIRROR_ENV = "RESTORE_DATA_MIRROR"
#: Suffix (before a timestamp) of an archive moved aside because it failed verification or extraction.
CORRUPT_SUFFIX = ".corrupt-"
_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


class PrepareError(Exception):
    """A preparation step that failed; the message is one sentence saying what happened and what to do."""


class ChecksumError(PrepareError, ValueError):
    """A file whose checksum differs from the expected one (it was moved aside, nothing was extracted)."""


class DownloadError(PrepareError, OSError):
    """A download that failed or was cut short (nothing was kept); the message says how to do it by hand."""


class ExtractError(PrepareError, ValueError):
    """An archive that could not be extracted (it was moved aside, nothing was left half-extracted)."""


@dataclass(frozen=True)
class Source:
    """One downloadable file: its name (also the name on a mirror), URL, checksums and where it goes.

    ``md5`` is torchvision's recorded MD5 for the same URL; ``sha256`` (none recorded yet) takes
    precedence when set, as does a SHA256 given on the command line."""

    filename: str
    url: str
    sha256: str | None = None
    extract_to: str = ""  # folder under ROOT to extract into; plain files are copied there
    inner: tuple[str, ...] = ()  # archives inside the extracted tree (relative to extract_to) to extract in place
    md5: str | None = None


@dataclass(frozen=True)
class Recipe:
    """How one benchmark is laid out under ROOT: its downloads, renames, manual steps and expected paths."""

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
    "dtd": Recipe((Source("dtd-r1.0.1.tar.gz", f"{_VGG}/dtd/download/dtd-r1.0.1.tar.gz",
                          md5="fff73e5086ae6bdbea199a49dfb8a4c1"),),
                  manual=_json_note("dtd"), check=("dtd/images",)),
    "oxford_pets": Recipe((Source("images.tar.gz", f"{_VGG}/pets/data/images.tar.gz", extract_to="oxford_pets",
                                  md5="5c4f3ee8e5d25df40f4fd59a7f44e54c"),
                           Source("annotations.tar.gz", f"{_VGG}/pets/data/annotations.tar.gz",
                                  extract_to="oxford_pets", md5="95a8c909bbe2e81eed6a22bccdf3f68f")),
                          manual=_json_note("oxford_pets"), check=("oxford_pets/images", "oxford_pets/annotations")),
    "oxford_flowers": Recipe((Source("102flowers.tgz", f"{_VGG}/flowers/102/102flowers.tgz",
                                     extract_to="oxford_flowers", md5="52808999861908f626f3c1f4e79d11fa"),
                              Source("imagelabels.mat", f"{_VGG}/flowers/102/imagelabels.mat",
                                     extract_to="oxford_flowers", md5="e0620be6f572b9609742df49c70aed4d")),
                             manual=_json_note("oxford_flowers") + " Also fetch cat_to_name.json (linked there).",
                             check=("oxford_flowers/jpg",)),
    "food101": Recipe((Source("food-101.tar.gz", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                              md5="85eeb15f3717b99a5da872d97d918f87"),),
                      manual=_json_note("food101"), check=("food-101/images",)),
    "fgvc_aircraft": Recipe((Source("fgvc-aircraft-2013b.tar.gz",
                                    f"{_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"),),
                            moves=(("fgvc-aircraft-2013b/data", "fgvc_aircraft"),),
                            check=("fgvc_aircraft/images", "fgvc_aircraft/variants.txt")),
    "eurosat": Recipe((Source("EuroSAT.zip", "http://madm.dfki.de/files/sentinel/EuroSAT.zip", extract_to="eurosat",
                              md5="c8fa014336c82ac7804f0398fcb19387"),),
                      manual=_json_note("eurosat"), check=("eurosat/2750",)),
    "caltech101": Recipe((Source("caltech-101.zip", "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                                 inner=("caltech-101/101_ObjectCategories.tar.gz",),
                                 md5="3138e1922a9193bfa496528edbbc45d0"),),
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


def _checksum(path: str, md5: str | None, sha256: str | None) -> tuple[bool, str]:
    """Whether ``path`` matches ``sha256`` (if given) else ``md5``, and a phrase giving the hash found."""
    if sha256:
        got = sha256_file(path)
        ok = got == sha256.lower()
        return ok, f"SHA256 {got}" + (" (verified)" if ok else f" instead of {sha256.lower()}")
    if md5:
        got = calculate_md5(path)
        ok = got == md5.lower()
        return ok, f"MD5 {got}" + (" (verified)" if ok else f" instead of the recorded {md5.lower()}")
    return True, f"SHA256 {sha256_file(path)} (unverified: no recorded checksum)"


def _fetch(url: str, part: str, dest: str) -> None:
    """Stream ``url`` into ``part``; DownloadError when it fails or ends before the announced Content-Length."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            announced = response.headers.get("Content-Length")
            size = 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except http.client.IncompleteRead as err:
        raise DownloadError(f"The download of {url} was cut short after {len(err.partial)} bytes; the partial file "
                            "was deleted, run the command again.") from err
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
        raise DownloadError(f"Could not download {url} ({getattr(err, 'reason', err)}): without network here, fetch "
                            f"it elsewhere and put it at {dest} (it is then reused), or serve the archives and pass "
                            "--mirror.") from err
    if announced is not None and announced.isdigit() and size != int(announced):
        raise DownloadError(f"The download of {url} was cut short after {size} of {announced} bytes (the connection "
                            "closed early); the partial file was deleted, run the command again.")


def download(url: str, dest: str, sha256: str | None = None, md5: str | None = None) -> str:
    """Make ``dest`` a complete, verified copy of ``url`` and return it.

    A file already at ``dest`` (fetched by hand, or kept by ``--keep-archives``) is reused when it
    matches ``sha256`` (else ``md5``; unverified when neither is known). Otherwise the bytes go to a
    temporary ``.part`` file beside ``dest`` that is renamed to ``dest`` only when its size matches the
    server's Content-Length and its checksum matches. A download cut short is deleted (DownloadError);
    a file with the wrong checksum is moved aside to ``dest.corrupt-<time>`` (ChecksumError naming it).
    """
    os.makedirs(osp.dirname(osp.abspath(dest)), exist_ok=True)
    if osp.isfile(dest):
        ok, found = _checksum(dest, md5, sha256)
        if ok:
            print(f"Reusing {dest}: {found}")
            return dest
        print(f"{dest} has {found}: moved it to {move_aside(dest, CORRUPT_SUFFIX)}; downloading it again")
    fd, part = tempfile.mkstemp(prefix=osp.basename(dest) + ".", suffix=".part", dir=osp.dirname(dest))
    os.close(fd)
    print(f"Downloading {url}")
    try:
        _fetch(url, part, dest)
        ok, found = _checksum(part, md5, sha256)
        os.replace(part, dest)
    finally:
        if osp.exists(part):
            os.remove(part)
    if not ok:
        aside = move_aside(dest, CORRUPT_SUFFIX)
        raise ChecksumError(f"The file downloaded from {url} has {found}, so it was moved to {aside} and nothing was "
                            "extracted: check the URL, mirror or --sha256 value, then delete that file and run the "
                            "command again.")
    print(found)
    return dest


def extract(archive: str, dest: str) -> None:
    """Extract a .zip/.tar/.tar.gz/.tgz into ``dest``, refusing members that would land outside it.

    Tar members go through the ``data`` filter (no absolute paths, links out of ``dest`` or device
    files), which torchvision's ``extract_archive`` does not apply; other files are copied."""
    os.makedirs(dest, exist_ok=True)
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            root = osp.realpath(dest)
            for member in zf.namelist():
                if not osp.realpath(osp.join(dest, member)).startswith(root + os.sep):
                    raise ValueError(f"member {member!r} points outside {dest}")
            zf.extractall(dest)
    elif archive.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    else:
        shutil.copy2(archive, osp.join(dest, osp.basename(archive)))


# What a damaged or hostile archive raises while it is read (not disk-full and other OSErrors of the machine).
_BAD_ARCHIVE = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError,
                ValueError)


def _merge(src: str, dst: str) -> None:
    """Move everything under ``src`` into ``dst``: new entries are renamed in, folders already there are
    merged, files already there are replaced, and files only in ``dst`` are kept."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = osp.join(src, name), osp.join(dst, name)
        if osp.isdir(s) and not osp.islink(s) and osp.isdir(d) and not osp.islink(d):
            _merge(s, d)
        else:
            os.replace(s, d)


def _unpack(src: Source, archive: str, root: str, moves: Sequence[tuple[str, str]]) -> None:
    """Extract ``archive`` into a hidden folder under ``root``, then merge it into place.

    An archive that fails to extract is moved aside (ExtractError naming where) and the hidden folder
    is removed, so no partial tree is left under ``root``."""
    staging = tempfile.mkdtemp(prefix=f".{src.filename}.", suffix=".partial", dir=root)
    try:
        target = osp.join(staging, src.extract_to)
        try:
            extract(archive, target)
            for inner in src.inner:
                inner_path = osp.join(target, inner)
                if not osp.isfile(inner_path):
                    raise ValueError(f"it holds no {inner}")
                extract(inner_path, osp.dirname(inner_path))
                os.remove(inner_path)
        except _BAD_ARCHIVE as err:
            aside = move_aside(archive, CORRUPT_SUFFIX)
            raise ExtractError(f"Could not extract {src.filename} ({err}), so it was moved to {aside} and nothing was "
                               f"extracted under {root}: delete that file and run the command again (or put a good "
                               f"copy at {archive}).") from err
        for old, new in moves:
            if osp.exists(osp.join(staging, old)):
                os.makedirs(osp.dirname(osp.join(staging, new)), exist_ok=True)
                os.rename(osp.join(staging, old), osp.join(staging, new))
        _merge(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sha256_overrides(name: str, values: Sequence[str]) -> dict[str, str]:
    """Turn ``--sha256`` values (``HEX`` or ``FILE=HEX``) into ``{file: hex}`` for dataset ``name``.

    A bare HEX applies to a dataset that downloads one file; anything else raises PrepareError."""
    key = resolve(name)
    files = [src.filename for src in RECIPES[key].sources]
    hashes: dict[str, str] = {}
    for value in values:
        filename, sep, hexdigest = value.rpartition("=")
        if not sep and len(files) > 1:
            raise PrepareError(f"--sha256 {value} is ambiguous: {key} downloads {len(files)} files "
                               f"({', '.join(files)}), so give FILE=HEX naming one of them.")
        hashes[filename if sep else (files or [""])[0]] = hexdigest
    _check_sha256(key, hashes)
    return hashes


def _check_sha256(key: str, hashes: Mapping[str, str]) -> None:
    """PrepareError (one sentence) for a malformed SHA256 or one naming a file ``key`` does not download."""
    files = [src.filename for src in RECIPES[key].sources]
    for filename, hexdigest in hashes.items():
        if not files:
            raise PrepareError(f"{key} has no archive to download, so --sha256 does not apply.")
        if not _SHA256_RE.fullmatch(hexdigest):
            raise PrepareError(f"--sha256 value {hexdigest!r} is not a SHA256 (64 hexadecimal characters): pass the "
                               "output of `sha256sum FILE` as HEX or FILE=HEX.")
        if filename not in files:
            raise PrepareError(f"--sha256 names {filename!r}, which {key} does not download; use one of "
                               f"{', '.join(files)}.")


def prepare(name: str, root: str, mirror: str | None = None, sha256: Mapping[str, str] | None = None,
            keep_archives: bool = False) -> list[str]:
    """Fetch and lay out dataset ``name`` under ``root``; return the manual steps still needed.

    ``mirror`` replaces each URL's base (the file name is kept); ``sha256`` maps file names to SHA256s
    that replace the recorded checksums. Archives are deleted once the whole layout is in place, unless
    ``keep_archives``.
    """
    key = resolve(name)
    _check_sha256(key, sha256 or {})
    recipe = RECIPES[key]
    root = osp.abspath(osp.expanduser(root))
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    downloads = osp.join(root, ".downloads")
    archives = []
    for src in recipe.sources:
        url = f"{mirror.rstrip('/')}/{src.filename}" if mirror else src.url
        expected = (sha256 or {}).get(src.filename, src.sha256)
        archive = download(url, osp.join(downloads, src.filename), sha256=expected, md5=None if expected else src.md5)
        print(f"Extracting {src.filename} into {osp.join(root, src.extract_to)}")
        _unpack(src, archive, root, recipe.moves)
        archives.append(archive)
    missing = [p for p in recipe.check if not osp.exists(osp.join(root, p))]
    if missing:
        raise PrepareError(f"After extraction {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
                           f"under {root}: the archives (kept in {downloads}) differ from the expected ones, see "
                           f"DATASETS.md#{key}.")
    if not keep_archives:
        for archive in archives:
            os.remove(archive)
    steps = [recipe.manual.replace("$ROOT", root)] if recipe.manual else []
    print(f"{BENCHMARKS[key][0]}: " + ("done." if not steps else "remaining step: " + steps[0]))
    return steps


def _downloadable() -> str:
    return ", ".join(key for key, recipe in RECIPES.items() if recipe.sources)


def _verified() -> str:
    return ", ".join(key for key, recipe in RECIPES.items()
                     if recipe.sources and all(src.md5 or src.sha256 for src in recipe.sources))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prepare one dataset; a failure prints one ``error:`` line and returns 2."""
    parser = argparse.ArgumentParser(
        prog="python -m restore.datasets.prepare",
        description="Download, verify and extract a benchmark dataset into the layout of DATASETS.md, then print "
                    "what is left to do by hand (mostly the split JSON).",
        epilog=f"Downloaded: {_downloadable()}. The others only print instructions. Archives are kept in "
               "ROOT/.downloads/ while they are extracted; one already there (put by hand) is reused when its "
               "checksum matches. Archives that fail verification or extraction are moved aside to "
               f"<file>{CORRUPT_SUFFIX}<time>. Checksums: torchvision's MD5s for {_verified()}; the other downloads "
               "are reported unverified (with their SHA256) unless --sha256 is given. Exit status: 0 done, 2 failed "
               "(one line on stderr says why).")
    parser.add_argument("name", help=f"dataset, yaml or class name (case-insensitive): {', '.join(BENCHMARKS)}")
    parser.add_argument("--root", required=True, help="DATASET.ROOT: the folder that holds all datasets")
    parser.add_argument("--mirror", default=None,
                        help=f"base URL serving the same file names (default: ${MIRROR_ENV}, else the "
                             "publishers' URLs)")
    parser.add_argument("--sha256", action="append", default=[], metavar="[FILE=]HEX",
                        help="expected SHA256 of a downloaded file, replacing the recorded MD5 (64 hex digits; FILE "
                             "may be left out when the dataset downloads one file; repeat for several files)")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep the archives in ROOT/.downloads/ after extraction (a later run reuses them)")
    args = parser.parse_args(argv)
    try:
        try:
            hashes = sha256_overrides(args.name, args.sha256)
        except ValueError as err:  # unknown dataset name
            raise PrepareError(str(err)) from None
        prepare(args.name, args.root, mirror=args.mirror, sha256=hashes, keep_archives=args.keep_archives)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's side: unwritable root, disk full, ...
        print(f"error: {err}; nothing was left half-written under {args.root}: fix this and run the command again.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
