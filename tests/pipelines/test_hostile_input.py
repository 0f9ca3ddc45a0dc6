"""Hostile input at each door: `prepare` (CamVid folders), `predict` (image folders and bucket prefixes) and
model loading (checkpoints, the registered pyfunc). Each is refused in one line naming the file, with exit
status 2 from the CLI; nothing runs, nothing is written outside the output folder, no partial output is left.
`serve` has its cases beside its server, in test_serve.py."""

import hashlib
import http.client
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image, ImageFile

from data_prep import storage
from data_prep.camvid import find_pairs
from data_prep.shards import write_shard
from pipelines.core import checkpoint as ckpt_io
from pipelines.predict import input_images, read_rgb
from pipelines.tracking.pyfunc_model import MAX_PIXELS, SegNetModel
from segnet import SegNetError, build_model
from tests.helpers import Code, error_line


def _refused(r: subprocess.CompletedProcess, command: str, fragment: str) -> str:
    """Exit status 2 and a last line `segnet COMMAND: error: ...` holding `fragment`; no traceback."""
    last = error_line(r, command)
    assert fragment in last, last
    return last


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------- prepare


def _hostile_camvid(root: Path, outside: Path, how: str, png_declaring) -> str:
    """Make a copy of real CamVid hostile in one way; returns a fragment the error must hold."""
    image = sorted((root / "train").iterdir())[0]
    label = root / "trainannot" / image.name
    if how == "decompression bomb":
        image.write_bytes(png_declaring(30000, 30000))
        return "declares over 40,000,000 pixels"
    if how == "header over the limit":  # 48 million: under PIL's own bomb limit, over ours
        image.write_bytes(png_declaring(8000, 6000))
        return "declares 8000x6000 pixels, over the limit of 40,000,000"
    if how == "truncated":
        image.write_bytes(image.read_bytes()[:5000])
        return f"{image} is not a readable PNG"
    if how == "text named .png":
        image.write_text("a text file, not a picture\n")
        return f"{image} is not a readable PNG (cannot identify image file"
    if how == "rgb label":
        Image.open(label).convert("RGB").save(label)
        return "has mode RGB (3 channels), expected a one-channel label"
    if how == "symlink out of the source":
        image.unlink()
        image.symlink_to(outside / "secret.png")
        return "outside the source folder"
    if how == "symlinked label folder":
        shutil.move(root / "trainannot", outside / "trainannot")
        (root / "trainannot").symlink_to(outside / "trainannot")
        return "outside the source folder"
    if how == "newline in a name":
        image.rename(image.with_name("evil\nname.png"))
        return "'evil\\nname.png'"
    if how == "dotdot in the listing":  # the SegNet list names ../../outside/secret.png
        (root / "train.txt").write_text(f"../../outside/secret.png {label}\n")
        return "secret.png is listed in train.txt but does not exist"
    raise AssertionError(how)


CONTENT = ["decompression bomb", "header over the limit", "truncated", "text named .png", "rgb label"]
LISTING = [
    "symlink out of the source",
    "symlinked label folder",
    "newline in a name",
    "dotdot in the listing",
]


@pytest.fixture
def hostile_source(small_camvid, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(next((small_camvid / "test").iterdir()), outside / "secret.png")
    return small_camvid, outside


@pytest.mark.parametrize("how", CONTENT + LISTING)
def test_prepare_refuses_hostile_input_by_name_before_decoding_it(
    hostile_source, png_declaring, tmp_path, monkeypatch, how
):
    """Through what `prepare` runs, in this process: its listing (`find_pairs`), then the task of each shard
    (`write_shard`, here one pair a shard); PIL's decoder is watched to show which images were decoded."""
    source, outside = hostile_source
    fragment = _hostile_camvid(source, outside, how, png_declaring)
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: decoded.append(img.size) or load(img))
    out, errors = tmp_path / "out", []
    out.mkdir()
    try:
        pairs = find_pairs(source)
    except SegNetError as e:
        errors.append(str(e))
    else:
        for split, listed in pairs.items():
            for i, pair in enumerate(listed):
                task = {"split": split, "index": i, "file": f"{split}-{i}.arrow", "out": str(out)}
                errors.append(write_shard({**task, "compression": "none", "pairs": [vars(pair)]})["error"])
    errors = [e for e in errors if e]
    assert len(errors) == 1 and fragment in errors[0] and "\n" not in errors[0], errors
    assert (8000, 6000) not in decoded and (30000, 30000) not in decoded  # refused from the header alone
    assert decoded or how in LISTING  # the watch works: the good images were decoded


@pytest.mark.slow
@pytest.mark.parametrize("how", ["decompression bomb", *LISTING])
def test_prepare_cli_exits_2_with_one_line_and_writes_nothing(
    hostile_source, png_declaring, ray_local, tmp_path, how, segnet_cli
):
    source, outside = hostile_source
    fragment = _hostile_camvid(source, outside, how, png_declaring)
    before = {"source": _tree(source), "outside": _tree(outside)}
    out = tmp_path / "out"
    r = segnet_cli("prepare", "--source", source, "--out", out, "--shard-size", "1", cwd=tmp_path)
    _refused(r, "prepare", fragment)
    assert not out.exists() or list(out.iterdir()) == []  # no manifest, no shard, no temporary file
    assert {"source": _tree(source), "outside": _tree(outside)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["camvid", "outside", *(["out"] * out.exists())]
    )


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("decompression bomb", "is over the limit of 40,000,000 pixels"),
        ("header over the limit", "has 8000x6000 pixels, over the limit"),
        ("over PIL's warning size", "is over the limit of 40,000,000 pixels"),  # 100 M: PIL warns, not raises
        ("over a lowered limit", "has 2000x1000 pixels, over the limit of 1,000,000"),
        ("text named .png", "cannot be decoded as an image"),
        ("truncated", "cannot be decoded as an image"),
    ],
)
def test_predict_refuses_an_image_it_cannot_or_should_not_decode(
    camvid_dir, png_declaring, tmp_path, how, fragment
):
    path = tmp_path / "in.png"
    camvid = sorted((camvid_dir / "test").iterdir())[0].read_bytes()
    data = {
        "decompression bomb": png_declaring(30000, 30000),
        "truncated": camvid[:5000],
        "header over the limit": png_declaring(8000, 6000),
        "over PIL's warning size": png_declaring(10000, 10000),
        "over a lowered limit": png_declaring(2000, 1000),
        "text named .png": b"text",
    }
    path.write_bytes(data[how])
    with pytest.raises(SegNetError) as e, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        read_rgb(str(path), 1_000_000 if how == "over a lowered limit" else MAX_PIXELS)
    assert [str(w.message) for w in warned] == []  # no DecompressionBombWarning on the way: one line only
    assert str(e.value).startswith(str(path)) and fragment in str(e.value) and "\n" not in str(e.value)


def _photos(tmp_path: Path, camvid_dir: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sorted((camvid_dir / "test").iterdir())[0], folder / "street.png")
    return folder


@pytest.mark.parametrize("how", ["symlink out of the input", "newline in a name"])
def test_predict_cli_refuses_a_hostile_input_listing_before_any_model_loads(
    camvid_dir, tmp_path, how, segnet_cli
):
    photos = _photos(tmp_path, camvid_dir)
    secret = tmp_path / "secret.png"
    shutil.copy(photos / "street.png", secret)
    if how == "symlink out of the input":
        (photos / "link.png").symlink_to(secret)
        fragment = f"links to {secret}, outside {photos}"
    else:
        shutil.copy(secret, photos / "two\nlines.png")
        fragment = "'two\\nlines.png'"
    out = tmp_path / "labels"
    r = segnet_cli(
        "predict", "--model", "models:/none@champion", "--input", photos, "--output", out, cwd=tmp_path
    )
    _refused(r, "predict", fragment)
    assert not out.exists()


def test_predict_cli_refuses_a_bucket_key_with_dotdot(s3, png_declaring, tmp_path, segnet_cli):
    """A key `in/../../escape.png` (S3 allows it) would put its label PNG two folders above --output."""
    endpoint = urlparse(s3["env"]["AWS_ENDPOINT_URL"])
    bucket = s3["bucket"].removeprefix("s3://")
    for key in ("hostile/in/street.png", "hostile/in/../../escape.png"):  # raw paths: nothing normalises them
        conn = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=30)
        conn.request("PUT", f"/{bucket}/{key}", body=png_declaring(48, 32))
        assert conn.getresponse().status == 200
        conn.close()
    with pytest.raises(SegNetError, match=r"'\.\./\.\./escape\.png' .* has a '\.\.' part"):
        input_images(f"{s3['bucket']}/hostile/in")
    before = _bucket_keys(s3["bucket"])
    for out in (tmp_path / "a" / "b" / "labels", f"{s3['bucket']}/hostile/a/b/labels"):
        args = ["predict", "--model", "models:/none@champion", "--input", f"{s3['bucket']}/hostile/in"]
        _refused(segnet_cli(*args, "--output", out, cwd=tmp_path), "predict", "has a '..' part")
        assert list(tmp_path.rglob("*")) == []
        assert _bucket_keys(s3["bucket"]) == before  # nothing written in the bucket either, nor removed


def _bucket_keys(bucket: str) -> list[str]:
    """Every key in the bucket, as the store lists them (`..` parts kept)."""
    fs, path = storage.resolve(bucket)
    return sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)))


# ---------------------------------------------------------------- model loading


def _hostile_checkpoint(folder: Path, marker: Path) -> Path:
    """A checkpoint whose model.pt is a pickle with code, its sha256 recorded as if it were genuine."""
    folder.mkdir(parents=True)
    torch.save(Code(marker), folder / "model.pt")
    torch.save({"optimizer": {}, "epoch": 0}, folder / "optimizer.pt")
    meta = {
        "config": {"model": "segnet-basic", "data": "x"},
        "num_classes": 11,
        "image_size": [64, 96],
        "epoch": 0,
        "weights_sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


REFUSAL = "is not a file of plain tensors (it asks to import posix.system): refusing to load it"


def test_a_checkpoint_that_pickles_code_is_refused_by_every_loader_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    folder = _hostile_checkpoint(tmp_path / "checkpoint", marker)
    with pytest.raises(SegNetError, match=REFUSAL.replace("(", r"\(").replace(")", r"\)")):
        ckpt_io.load(folder)
    model = build_model("segnet-basic", num_classes=11)
    with pytest.raises(SegNetError, match="plain tensors"):
        ckpt_io.restore(folder, model, torch.optim.SGD(model.parameters(), lr=0.1))
    context = SimpleNamespace(
        artifacts={"weights": str(folder / "model.pt"), "meta": str(folder / "meta.json")}
    )
    with pytest.raises(SegNetError, match="plain tensors"):  # the registered pyfunc, as MLflow loads it
        SegNetModel().load_context(context)
    assert not marker.exists()


@pytest.mark.slow
def test_evaluate_cli_refuses_a_checkpoint_that_pickles_code(shards_4, tmp_path, segnet_cli):
    marker = tmp_path / "marker"
    folder = _hostile_checkpoint(tmp_path / "checkpoint", marker)
    before = _tree(tmp_path)
    r = segnet_cli("evaluate", "--checkpoint", folder, "--data", shards_4, "--split", "test", cwd=tmp_path)
    _refused(r, "evaluate", f"{folder}/model.pt {REFUSAL}")
    assert not marker.exists()
    assert _tree(tmp_path) == before  # no eval-test folder, nothing else


def test_a_plain_png_of_camvid_size_still_decodes(tmp_path):
    """The limits refuse what they should and nothing else: a real-sized PNG decodes."""
    path = tmp_path / "ok.png"
    buffer = io.BytesIO()
    Image.new("RGB", (480, 360)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    assert read_rgb(str(path)).shape == (360, 480, 3)
