import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import iter_samples, prepare, ray_dataset, read_manifest
from data_prep.camvid import CAMVID32_TO_11, SPLITS
from segnet import SegNetError, class_weights
from tests.helpers import error_line, flip_a_byte, segnet, start_segnet, wait_until

pytestmark = pytest.mark.slow  # every test here runs Ray Data


def _labels(camvid_dir, split):
    return sorted((camvid_dir / f"{split}annot").glob("*.png"))


def test_full_camvid_counts(full_shards):
    m = read_manifest(full_shards)
    assert [m["splits"][s]["num_images"] for s in SPLITS] == [367, 101, 233]
    for s in SPLITS:
        assert sum(sh["rows"] for sh in m["splits"][s]["shards"]) == m["splits"][s]["num_images"]


def test_class_pixel_counts_equal_a_direct_count(full_shards, camvid_dir):
    m = read_manifest(full_shards)
    for split in SPLITS:
        counts, image_counts = np.zeros(12, np.int64), np.zeros(12, np.int64)
        for path in _labels(camvid_dir, split):
            label = np.asarray(Image.open(path))
            bins = np.bincount(label.reshape(-1), minlength=12)
            counts += bins
            image_counts += (bins > 0) * label.size
        assert m["splits"][split]["class_pixel_counts"] == counts.tolist()
        assert m["splits"][split]["image_pixel_counts"] == image_counts.tolist()


def test_median_frequency_weights_follow_from_the_counts(full_shards):
    m = read_manifest(full_shards)
    train = m["splits"]["train"]
    freq = np.array(train["class_pixel_counts"][:11]) / np.array(train["image_pixel_counts"][:11])
    assert m["class_weights"]["median_frequency"] == pytest.approx((np.median(freq) / freq).tolist())
    expected = class_weights(train["class_pixel_counts"][:11], mode="inverse_frequency")
    assert m["class_weights"]["inverse_frequency"] == pytest.approx(expected.tolist())


@pytest.mark.parametrize("split", SPLITS)
def test_iter_samples_is_bit_identical_to_the_pngs(full_shards, camvid_dir, split):
    samples = list(iter_samples(full_shards, split))
    listed = [Path(line.split()[0]).stem for line in (camvid_dir / f"{split}.txt").read_text().splitlines()]
    assert [s["name"] for s in samples] == listed
    for s in samples:
        image = np.asarray(Image.open(camvid_dir / split / f"{s['name']}.png"))
        label = np.asarray(Image.open(camvid_dir / f"{split}annot" / f"{s['name']}.png"))
        assert s["image"].dtype == np.uint8 and s["label"].dtype == np.uint8
        assert np.array_equal(s["image"], image) and np.array_equal(s["label"], label)


def test_rerun_on_unchanged_source_does_nothing(small_camvid, ray_local, tmp_path):
    out = tmp_path / "out"
    prepare(small_camvid, out, shard_size=1)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    said = []
    prepare(small_camvid, out, shard_size=1, log=said.append)
    assert any("nothing to do" in line for line in said)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_changed_source_or_force_rebuilds(small_camvid, ray_local, tmp_path):
    out = tmp_path / "out"
    first = prepare(small_camvid, out, shard_size=1)
    # a changed source: one label replaced by another real label
    label = sorted((small_camvid / "trainannot").iterdir())[0]
    other = sorted((small_camvid / "trainannot").iterdir())[1]
    label.write_bytes(other.read_bytes())
    second = prepare(small_camvid, out, shard_size=1)
    assert second["source_fingerprint"] != first["source_fingerprint"]
    assert second["splits"]["train"]["shards"][0]["sha256"] != first["splits"]["train"]["shards"][0]["sha256"]
    said = []
    prepare(small_camvid, out, shard_size=2, force=True, log=said.append)
    assert not any("nothing to do" in line for line in said)
    m = read_manifest(out)
    assert len(m["splits"]["train"]["shards"]) == 1
    # shards of the earlier build are gone; only the manifest's remain
    assert sorted(p.name for p in out.glob("*.arrow")) == sorted(
        sh["file"] for s in SPLITS for sh in m["splits"][s]["shards"]
    )


def test_tampered_shard_is_refused_when_read(small_camvid, ray_local, tmp_path):
    out = tmp_path / "out"
    m = prepare(small_camvid, out, shard_size=2)
    shard = out / m["splits"]["val"]["shards"][0]["file"]
    flip_a_byte(shard)
    refused = f"shard {shard} does not match its checksum in the manifest"  # by name
    with pytest.raises(SegNetError, match=refused):
        list(iter_samples(out, "val"))
    with pytest.raises(SegNetError, match=refused):
        ray_dataset(out, "val")
    r = segnet("train", "--data", str(out), "--image-size", "64x96", cwd=tmp_path, timeout=300)  # no worker
    assert error_line(r, "train") == f"segnet train: error: {refused}: refusing it"
    assert len(list(iter_samples(out, "train"))) == 2  # the other splits are still served


def test_ray_dataset_serves_every_row(small_camvid, ray_local, tmp_path):
    out = tmp_path / "out"
    prepare(small_camvid, out, shard_size=1)
    ds = ray_dataset(out, "train")
    assert ds.count() == 2
    assert set(ds.columns()) >= {"name", "image", "label", "height", "width"}


def _damage(root: Path, how: str) -> str:
    """Damage a copy of real CamVid in one way; return a fragment the error must contain."""
    img = sorted((root / "train").iterdir())[0]
    lab = root / "trainannot" / img.name
    if how == "truncated":
        img.write_bytes(img.read_bytes()[:5000])
        return img.name
    if how == "not_png":
        Image.open(img).save(img, format="JPEG")
        return "expected a PNG"
    if how == "grey_image":
        Image.open(img).convert("L").save(img)
        return "expected RGB"
    if how == "rgb_label":
        Image.open(lab).convert("RGB").save(lab)
        return "expected a one-channel label"
    if how == "label_value":
        a = np.asarray(Image.open(lab)).copy()
        a[0, 0] = 200
        Image.fromarray(a).save(lab)
        return "label value 200"
    if how == "size_mismatch":
        Image.open(lab).crop((0, 0, 100, 100)).save(lab)
        return "but its label"
    if how == "missing_label":
        lab.unlink()
        return "has no label"
    if how == "empty_split":
        for p in (root / "val").iterdir():
            p.unlink()
        return "split 'val' is empty"
    if how == "missing_split":
        for p in (root / "test").iterdir():
            p.unlink()
        (root / "test").rmdir()
        return "split 'test' is missing"
    raise AssertionError(how)


BAD = ["truncated", "not_png", "grey_image", "rgb_label", "label_value", "size_mismatch", "missing_label"]


@pytest.mark.parametrize("how", BAD + ["empty_split", "missing_split"])
def test_bad_input_is_named_and_leaves_no_manifest(small_camvid, ray_local, tmp_path, how):
    fragment = _damage(small_camvid, how)
    out = tmp_path / "out"
    with pytest.raises(SegNetError, match=fragment):
        prepare(small_camvid, out, shard_size=1)
    assert not (out / "manifest.json").exists()


def test_bad_input_rebuild_removes_the_old_manifest(small_camvid, ray_local, tmp_path):
    out = tmp_path / "out"
    prepare(small_camvid, out, shard_size=1)
    _damage(small_camvid, "truncated")
    with pytest.raises(SegNetError):
        prepare(small_camvid, out, shard_size=1)
    assert not (out / "manifest.json").exists()  # never a manifest that disagrees with its source


def test_cli_bad_input_exits_nonzero_with_one_line(small_camvid, tmp_path):
    _damage(small_camvid, "label_value")
    r = segnet("prepare", "--source", str(small_camvid), "--out", str(tmp_path / "out"), "--workers", "1")
    assert "label value 200" in error_line(r, "prepare")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_interrupted_run_leaves_no_manifest_then_recovers(camvid_dir, tmp_path):
    out = tmp_path / "out"
    # 20 images a split in shards of one: the first shard is written long before the last
    args = ["prepare", "--source", str(camvid_dir), "--out", str(out), "--limit", "20", "--shard-size", "1"]
    args += ["--workers", "1"]
    # Ctrl-C's SIGINT, delivered even when this test runs in a background job (which inherits SIGINT ignored)
    proc = start_segnet(
        *args, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    wait_until(lambda: list(out.glob("*.arrow")), 240, proc, every=0.02)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()
    with pytest.raises(SegNetError, match="no manifest.json"):
        list(iter_samples(out, "train"))
    # the next run builds a complete manifest whose every shard is present and intact
    r = segnet(*args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert [m["splits"][s]["num_images"] for s in SPLITS] == [20, 20, 20]
    assert sum(1 for _ in iter_samples(out, "test")) == 20


def test_original_release_colour_labels_map_to_camvid11(small_camvid, ray_local, tmp_path):
    """Rewrite the SegNet labels as the original release's RGB colour labels, then prepare that."""
    colour_of = {}
    for colour, cls in CAMVID32_TO_11.items():
        colour_of.setdefault(cls, colour)
    root = tmp_path / "original"
    for split in SPLITS:
        (root / split).mkdir(parents=True)
        (root / f"{split}_labels").mkdir()
        for img in sorted((small_camvid / split).iterdir()):
            (root / split / img.name).write_bytes(img.read_bytes())
            label = np.asarray(Image.open(small_camvid / f"{split}annot" / img.name))
            rgb = np.zeros((*label.shape, 3), np.uint8)
            for cls, colour in colour_of.items():
                rgb[label == cls] = colour
            Image.fromarray(rgb).save(root / f"{split}_labels" / f"{img.stem}_L.png")
    out = tmp_path / "out"
    prepare(root, out, shard_size=4)
    for s in iter_samples(out, "train"):
        assert np.array_equal(
            s["label"], np.asarray(Image.open(small_camvid / "trainannot" / f"{s['name']}.png"))
        )
    # a colour outside the 32 classes is an error naming the file and the colour
    bad = sorted((root / "val_labels").iterdir())[0]
    rgb = np.asarray(Image.open(bad)).copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(bad)
    with pytest.raises(SegNetError, match=r"colour \(1, 2, 3\) is not a CamVid class"):
        prepare(root, out, shard_size=4)
