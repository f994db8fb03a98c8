"""``python -m restore.datasets.prepare``: downloads from a loopback HTTP server only (no network).

Cut-short downloads, wrong checksums and archives that fail to extract; reuse of verified archives;
torchvision's recorded MD5s; one-sentence errors for bad command-line input.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import io
import os
import random
import tarfile
import threading
import zipfile

import pytest

import datasets  # noqa: F401  (registers the loaders)
from restore.datasets import prepare as P
from restore.datasets.synthetic import make_synthetic
from restore.engine.config import get_cfg_default
from restore.engine.data import DataManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTD, EUROSAT = "dtd-r1.0.1.tar.gz", "EuroSAT.zip"


class Server:
    """Files served from 127.0.0.1: ``files[name] = bytes``; ``cut[name] = n`` withholds the last n bytes
    while still announcing the full Content-Length, then closes the connection; ``hits`` counts GETs."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.url = ""


@pytest.fixture
def server():
    state = Server()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            name = self.path.lstrip("/")
            state.hits[name] += 1
            if name not in state.files:
                self.send_error(404)
                return
            body = state.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) - state.cut.get(name, 0)])  # HTTP/1.0: the connection closes after

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _noise_jpgs(folder, names):
    """Incompressible files, so that a cut in a compressed archive falls after the first members."""
    rng = random.Random(0)
    for cls in names:
        os.makedirs(folder / cls, exist_ok=True)
        for j in range(3):
            (folder / cls / f"{cls}_{j + 1}.jpg").write_bytes(rng.randbytes(4096))


def dtd_archive(tmp_path) -> bytes:
    """A DTD-layout ``dtd-r1.0.1.tar.gz`` (top folder ``dtd/``) with two classes."""
    stage = tmp_path / "stage"
    make_synthetic("dtd", stage, num_classes=2, images_per_class=5, split_json=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(stage / "dtd", arcname="dtd")
    return buf.getvalue()


def eurosat_zip(tmp_path) -> bytes:
    """An ``EuroSAT.zip`` holding ``2750/<Class>/*.jpg`` (stored, not deflated)."""
    stage = tmp_path / "stage"
    _noise_jpgs(stage / "2750", ["AnnualCrop", "Forest", "Highway"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for d, _, files in sorted(os.walk(stage)):
            for f in sorted(files):
                zf.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), stage))
    return buf.getvalue()


def corrupt_tar_gz(tmp_path) -> bytes:
    """A dtd tar.gz cut at 70%: the first members extract, then the gzip stream ends."""
    stage = tmp_path / "stage"
    _noise_jpgs(stage / "dtd" / "images", ["banded", "blotchy", "braided"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(stage / "dtd", arcname="dtd")
    data = buf.getvalue()
    return data[:int(len(data) * 0.7)]


def corrupt_zip(tmp_path) -> bytes:
    """An EuroSAT.zip whose last member's bytes are altered: its CRC check fails after the others extracted."""
    data = bytearray(eurosat_zip(tmp_path))
    last = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[-1]
    data[last.header_offset + 30 + len(last.filename.encode()) + 10] ^= 0xFF  # inside its stored data
    return bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def with_md5(monkeypatch, key: str, value: str | None) -> None:
    """Pretend the recorded MD5 of ``key``'s only archive is ``value``."""
    recipe = P.RECIPES[key]
    (src,) = recipe.sources
    monkeypatch.setitem(P.RECIPES, key, dataclasses.replace(recipe, sources=(dataclasses.replace(src, md5=value),)))


def tree(path) -> list[str]:
    """Every file and folder under ``path`` (hidden ones included), relative and sorted."""
    out = []
    for d, dirs, files in os.walk(path):
        out += [os.path.relpath(os.path.join(d, x), path) for x in dirs + files]
    return sorted(out)


def run_main(argv, capsys) -> tuple[int, str, str]:
    rc = P.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------------------------------ downloads


def test_truncated_download_is_detected_deleted_and_fetched_again(tmp_path, server, monkeypatch, capsys):
    """The server announces more bytes than it sends: no checksum is needed to notice, nothing is kept
    (neither under the archive's name nor as a partial file), and the next run downloads again."""
    with_md5(monkeypatch, "dtd", None)  # no recorded checksum: only the Content-Length can tell
    data = dtd_archive(tmp_path)
    server.files[DTD], server.cut[DTD] = data, 1000
    root = tmp_path / "root"
    rc, _, err = run_main(["dtd", "--root", root, "--mirror", server.url], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.strip() == (f"error: The download of {server.url}/{DTD} was cut short after {len(data) - 1000} of "
                           f"{len(data)} bytes (the connection closed early); the partial file was deleted, run the "
                           "command again.")
    assert tree(root) == [".downloads"]  # no archive, no .part file, nothing extracted

    del server.cut[DTD]
    rc, out, _ = run_main(["dtd", "--root", root, "--mirror", server.url, "--keep-archives"], capsys)
    assert rc == 0 and server.hits[DTD] == 2 and "Reusing" not in out  # fetched again, not reused
    assert "(unverified: no recorded checksum)" in out and sha(data) in out
    assert (root / ".downloads" / DTD).read_bytes() == data
    assert sorted(os.listdir(root / "dtd" / "images")) == ["banded", "blotchy"]


def test_wrong_checksum_moves_the_download_aside_and_says_where(tmp_path, server, capsys):
    data = dtd_archive(tmp_path)
    server.files[DTD] = data
    root = tmp_path / "root"
    rc, _, err = run_main(["dtd", "--root", root, "--mirror", server.url, "--sha256", "0" * 64], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    (aside,) = os.listdir(root / ".downloads")
    assert aside.startswith(DTD + P.CORRUPT_SUFFIX)
    path = root / ".downloads" / aside
    assert path.read_bytes() == data  # kept for inspection, under a name that is never reused
    assert err.strip() == (f"error: The file downloaded from {server.url}/{DTD} has SHA256 {sha(data)} instead of "
                           f"{'0' * 64}, so it was moved to {path} and nothing was extracted: check the URL, mirror or "
                           "--sha256 value, then delete that file and run the command again.")
    assert tree(root) == [".downloads", f".downloads/{aside}"]


def test_the_recorded_md5_is_checked_when_no_sha256_is_given(tmp_path, server):
    """dtd's archive has torchvision's MD5 recorded; a different file under its name is refused."""
    data = dtd_archive(tmp_path)
    server.files[DTD] = data
    root = tmp_path / "root"
    with pytest.raises(P.ChecksumError) as info:
        P.prepare("dtd", str(root), mirror=server.url)
    assert f"has MD5 {md5(data)} instead of the recorded fff73e5086ae6bdbea199a49dfb8a4c1" in str(info.value)
    assert not (root / "dtd").exists() and not (root / ".downloads" / DTD).exists()


def test_a_bad_archive_put_by_hand_is_moved_aside_then_downloaded(tmp_path, server, capsys):
    data = dtd_archive(tmp_path)
    server.files[DTD] = data
    root = tmp_path / "root"
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / DTD).write_bytes(b"<html>not the archive</html>")
    rc, out, _ = run_main(["dtd", "--root", root, "--mirror", server.url, "--sha256", f"{DTD}={sha(data)}"], capsys)
    assert rc == 0 and server.hits[DTD] == 1
    (aside,) = os.listdir(root / ".downloads")  # the good archive was removed after extraction
    assert aside.startswith(DTD + P.CORRUPT_SUFFIX)
    assert (root / ".downloads" / aside).read_bytes() == b"<html>not the archive</html>"
    assert f"moved it to {root / '.downloads' / aside}; downloading it again" in out
    assert sorted(os.listdir(root / "dtd" / "images")) == ["banded", "blotchy"]


# ----------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("name,filename,make", [("dtd", DTD, corrupt_tar_gz), ("eurosat", EUROSAT, corrupt_zip)])
def test_failing_extraction_leaves_no_partial_folder(tmp_path, server, capsys, name, filename, make):
    """The archive verifies (its own SHA256 is given) but breaks half-way through extraction."""
    data = make(tmp_path)
    server.files[filename] = data
    root = tmp_path / "root"
    kept = root / "eurosat" / "split_zhou_EuroSAT.json"  # a file the user already put there
    kept.parent.mkdir(parents=True)
    kept.write_text('{"train": []}')
    rc, _, err = run_main([name, "--root", root, "--mirror", server.url, "--sha256", sha(data)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    (aside,) = os.listdir(root / ".downloads")
    path = root / ".downloads" / aside
    assert aside.startswith(filename + P.CORRUPT_SUFFIX) and path.read_bytes() == data
    assert err.startswith(f"error: Could not extract {filename} (")
    assert err.strip().endswith(f"so it was moved to {path} and nothing was extracted under {root}: delete that file "
                                f"and run the command again (or put a good copy at {root / '.downloads' / filename}).")
    # nothing half-extracted: only the moved-aside archive and the user's file
    assert tree(root) == [".downloads", f".downloads/{aside}", "eurosat", "eurosat/split_zhou_EuroSAT.json"]
    assert kept.read_text() == '{"train": []}'


def test_good_archive_extracts_and_a_second_run_reuses_it_without_downloading(tmp_path, server, monkeypatch, capsys):
    data = dtd_archive(tmp_path)
    with_md5(monkeypatch, "dtd", md5(data))  # as if torchvision's MD5 were this archive's
    server.files[DTD] = data
    root = tmp_path / "root"
    steps = P.prepare("dtd", str(root), mirror=server.url, keep_archives=True)
    assert server.hits[DTD] == 1 and f"MD5 {md5(data)} (verified)" in capsys.readouterr().out
    assert steps and "split_zhou_DescribableTextures.json" in steps[0]
    assert os.listdir(root / ".downloads") == [DTD] and sorted(os.listdir(root)) == [".downloads", "dtd"]
    cfg = get_cfg_default()
    cfg.merge_from_file(os.path.join(REPO, "configs", "datasets", "dtd.yaml"))
    cfg.DATASET.ROOT, cfg.VERBOSE, cfg.DATALOADER.NUM_WORKERS = str(root), False, 0
    assert DataManager(cfg).dataset.classnames == ["banded", "blotchy"]  # the extracted tree loads

    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_text("{}")  # added by the user between the runs
    P.prepare("dtd", str(root), mirror=server.url)
    assert server.hits[DTD] == 1  # no second download
    assert f"Reusing {root / '.downloads' / DTD}: MD5 {md5(data)} (verified)" in capsys.readouterr().out
    assert split.read_text() == "{}" and sorted(os.listdir(root / "dtd" / "images")) == ["banded", "blotchy"]
    assert os.listdir(root / ".downloads") == []  # removed this time (no --keep-archives)


def test_zip_extracts_into_its_folder_with_a_bare_sha256(tmp_path, server, capsys):
    data = eurosat_zip(tmp_path)
    server.files[EUROSAT] = data
    root = tmp_path / "root"
    rc, out, err = run_main(["EuroSAT", "--root", root, "--mirror", server.url, "--sha256", sha(data).upper()], capsys)
    assert rc == 0 and err == ""
    assert f"SHA256 {sha(data)} (verified)" in out
    assert sorted(os.listdir(root / "eurosat" / "2750")) == ["AnnualCrop", "Forest", "Highway"]
    assert sorted(os.listdir(root)) == [".downloads", "eurosat"] and os.listdir(root / ".downloads") == []


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_renamed_folders_and_inner_archives_land_in_the_layout_also_on_a_rerun(tmp_path, server, capsys):
    """fgvc_aircraft's data/ folder is renamed, caltech101's inner tar.gz is extracted in place; running
    again over the finished layout merges into it (the user's split file stays)."""
    server.files["fgvc-aircraft-2013b.tar.gz"] = _tar_gz({
        "fgvc-aircraft-2013b/data/images/0001.jpg": b"jpg", "fgvc-aircraft-2013b/data/variants.txt": b"707-320\n",
        "fgvc-aircraft-2013b/README.html": b"readme"})
    inner = _tar_gz({"101_ObjectCategories/accordion/image_0001.jpg": b"jpg"})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("caltech-101/101_ObjectCategories.tar.gz", inner)
        zf.writestr("caltech-101/Annotations.tar", b"")
    server.files["caltech-101.zip"] = buf.getvalue()
    root = tmp_path / "root"
    for run in range(2):
        assert P.main(["fgvc_aircraft", "--root", str(root), "--mirror", server.url]) == 0
        assert P.main(["caltech101", "--root", str(root), "--mirror", server.url,
                       "--sha256", sha(server.files["caltech-101.zip"])]) == 0
        if run == 0:
            (root / "caltech-101" / "split_zhou_Caltech101.json").write_text("{}")  # put there between the runs
    assert server.hits == {"fgvc-aircraft-2013b.tar.gz": 2, "caltech-101.zip": 2}
    assert tree(root) == [".downloads", "caltech-101", "caltech-101/101_ObjectCategories",
                          "caltech-101/101_ObjectCategories/accordion",
                          "caltech-101/101_ObjectCategories/accordion/image_0001.jpg", "caltech-101/Annotations.tar",
                          "caltech-101/split_zhou_Caltech101.json", "fgvc-aircraft-2013b",
                          "fgvc-aircraft-2013b/README.html", "fgvc_aircraft", "fgvc_aircraft/images",
                          "fgvc_aircraft/images/0001.jpg", "fgvc_aircraft/variants.txt"]
    assert "unverified" in capsys.readouterr().out  # fgvc_aircraft has no recorded checksum


def test_an_archive_without_the_expected_folders_is_reported_and_kept(tmp_path, server, capsys):
    data = _tar_gz({"dtd-r1.0.1/README": b"other layout"})
    server.files[DTD] = data
    root = tmp_path / "root"
    rc, _, err = run_main(["dtd", "--root", root, "--mirror", server.url, "--sha256", sha(data)], capsys)
    assert (rc, err.strip()) == (2, f"error: After extraction dtd/images is missing under {root}: the archives "
                                    f"(kept in {root / '.downloads'}) differ from the expected ones, see "
                                    "DATASETS.md#dtd.")
    assert (root / ".downloads" / DTD).read_bytes() == data


def test_offline_gives_one_line_and_reuses_an_archive_put_by_hand(tmp_path, capsys):
    data = dtd_archive(tmp_path)
    root = tmp_path / "root"
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    argv = ["dtd", "--root", root, "--mirror", dead, "--sha256", f"{DTD}={sha(data)}"]
    rc, _, err = run_main(argv, capsys)
    dest = root / ".downloads" / DTD
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: Could not download {dead}/{DTD} (")
    assert f"put it at {dest} (it is then reused)" in err
    assert os.listdir(root / ".downloads") == []
    dest.write_bytes(data)  # fetched elsewhere, put where it said
    rc, out, _ = run_main(argv, capsys)
    assert rc == 0 and f"Reusing {dest}: SHA256 {sha(data)} (verified)" in out
    assert sorted(os.listdir(root / "dtd" / "images")) == ["banded", "blotchy"]


# ---------------------------------------------------------------------------------- recorded checksums


def test_recorded_md5s_are_torchvisions_for_the_same_files(tmp_path, monkeypatch):
    """Each recorded MD5 is the one torchvision's dataset class uses for the same URL (EuroSAT: torchvision
    now fetches the unmodified file from a Hugging Face re-host); the others have none recorded."""
    from torchvision import datasets as tvd
    from torchvision.datasets import caltech, eurosat

    called = []

    class Fetched(Exception):
        pass

    def record(url, *args, md5=None, **kwargs):  # stands in for the download: note what it was asked for
        called.append((url, md5))
        raise Fetched

    monkeypatch.setattr(caltech, "download_and_extract_archive", record)
    monkeypatch.setattr(eurosat, "download_and_extract_archive", record)
    cal = tvd.Caltech101.__new__(tvd.Caltech101)
    cal.root, cal._check_integrity = str(tmp_path), lambda: False
    euro = tvd.EuroSAT.__new__(tvd.EuroSAT)
    euro._base_folder, euro._check_exists = str(tmp_path), lambda: False
    for dataset in (cal, euro):
        with pytest.raises(Fetched):
            dataset.download()
    (caltech_url, caltech_md5), (eurosat_url, eurosat_md5) = called

    flowers = tvd.Flowers102._download_url_prefix
    expected = {
        tvd.DTD._URL: tvd.DTD._MD5,
        tvd.Food101._URL: tvd.Food101._MD5,
        **dict(tvd.OxfordIIITPet._RESOURCES),
        flowers + tvd.Flowers102._file_dict["image"][0]: tvd.Flowers102._file_dict["image"][1],
        flowers + tvd.Flowers102._file_dict["label"][0]: tvd.Flowers102._file_dict["label"][1],
        caltech_url: caltech_md5,
    }
    ours = {src.url: src.md5 for recipe in P.RECIPES.values() for src in recipe.sources if src.md5}
    (euro_src,) = P.RECIPES["eurosat"].sources
    assert euro_src.md5 == eurosat_md5 and eurosat_url.endswith("/" + euro_src.filename)
    del ours[euro_src.url]
    assert ours == expected
    unrecorded = sorted(k for k, r in P.RECIPES.items() for s in r.sources if not (s.md5 or s.sha256))
    assert unrecorded == ["fgvc_aircraft", "imagenet_a", "imagenet_r", "imagenetv2"]


# ---------------------------------------------------------------------------------- bad command lines

BAD_INPUTS = [  # (argv after --root, the one line printed)
    (["dtdd"], "error: Unknown dataset 'dtdd'. Did you mean 'dtd'? Choose one of ['caltech101', 'dtd', 'eurosat', "
               "'fgvc_aircraft', 'food101', 'imagenet', 'imagenet_a', 'imagenet_r', 'imagenet_sketch', 'imagenetv2', "
               "'oxford_flowers', 'oxford_pets', 'stanford_cars', 'sun397', 'ucf101']."),
    (["dtd", "--sha256", "abc123"], "error: --sha256 value 'abc123' is not a SHA256 (64 hexadecimal characters): pass "
                                    "the output of `sha256sum FILE` as HEX or FILE=HEX."),
    (["dtd", "--sha256", f"{DTD}={'g' * 64}"], f"error: --sha256 value '{'g' * 64}' is not a SHA256 (64 hexadecimal "
                                               "characters): pass the output of `sha256sum FILE` as HEX or FILE=HEX."),
    (["dtd", "--sha256", f"dtd.tar={'a' * 64}"], "error: --sha256 names 'dtd.tar', which dtd does not download; use "
                                                 "one of dtd-r1.0.1.tar.gz."),
    (["oxford_pets", "--sha256", "a" * 64],
     f"error: --sha256 {'a' * 64} is ambiguous: oxford_pets downloads 2 files (images.tar.gz, annotations.tar.gz), "
     "so give FILE=HEX naming one of them."),
    (["imagenet", "--sha256", "a" * 64], "error: imagenet has no archive to download, so --sha256 does not apply."),
]


@pytest.mark.parametrize("argv,line", BAD_INPUTS, ids=["name", "short", "not-hex", "file", "ambiguous", "none"])
def test_bad_command_line_gives_one_sentence_and_exit_2(tmp_path, capsys, argv, line):
    root = tmp_path / "root"
    rc, out, err = run_main([argv[0], "--root", root, *argv[1:]], capsys)
    assert (rc, err.strip(), out) == (2, line, "")
    assert not root.exists()  # nothing written


def test_help_names_every_dataset_and_option(capsys):
    with pytest.raises(SystemExit) as info:
        P.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert all(key in out for key in P.RECIPES)
    for option in ("--root", "--mirror", "--sha256 [FILE=]HEX", "--keep-archives", "RESTORE_DATA_MIRROR"):
        assert option in out
    assert "Downloaded: dtd, oxford_pets, oxford_flowers, food101, fgvc_aircraft, eurosat" in " ".join(out.split())
    assert ".corrupt-<time>" in out and "Exit status: 0 done, 2 failed" in " ".join(out.split())
