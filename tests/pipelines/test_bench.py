import json

import pytest

from data_prep import prepare


@pytest.mark.slow
def test_bench_data_prints_measured_figures(small_camvid, ray_local, tmp_path, segnet_cli):
    prepare(small_camvid, tmp_path / "shards", shard_size=2)
    args = ["bench", "data", "--data", tmp_path / "shards", "--source", small_camvid, "--samples", "2"]
    r = segnet_cli(*args, "--image-size", "90x120", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(r.stdout)
    for key in (
        "png_decode_per_s",
        "shard_read_per_s",
        "png_decode_augment_per_s",
        "shard_read_augment_per_s",
    ):
        assert figures[key] > 0
    assert figures["samples"] == 2 and figures["manifest_images"] == 2
    r = segnet_cli("bench", "storage", "--data", tmp_path / "shards", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["streamed_per_s"] > 0  # stdout: the document alone


@pytest.mark.slow
def test_bench_train_json_is_the_only_thing_on_stdout(shards_4, segnet_cli):
    """4 training images in batches of 2: two steps an epoch, the first not timed, so each figure exists."""
    args = ["bench", "train", "--data", shards_4, "--image-size", "32x48", "--batch-size", "2"]
    r = segnet_cli(*args, "--epochs", "1", "--cpus", "2", "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(r.stdout)
    assert figures["plain_images_per_s"] > 0 and figures["ray_train_2_worker_images_per_s"] > 0


@pytest.mark.slow
def test_bench_scale_json_gives_each_sizes_per_image_costs_and_deletes_it(small_camvid, tmp_path, segnet_cli):
    """`segnet bench scale` on 6 real CamVid pairs at 2x: 12 new images prepared in a child process, every
    per-image cost measured and positive, the node cache a copy of the shards, the size deleted after."""
    out = tmp_path / "scale"
    args = ["--source", small_camvid, "--out", out, "--factors", "2", "--read-seconds", "1", "--json"]
    r = segnet_cli("bench", "scale", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (size,) = json.loads(r.stdout)["sizes"]
    assert size["factor"] == 2 and size["images"] == 12
    for key in ("prepare_s_per_image", "shard_bytes_per_image", "verify_s_per_image", "read_samples_per_s"):
        assert size[key] > 0, key
    assert size["prepare_peak_rss_bytes"] > 50 * 2**20  # the process tree of a Ray Data job
    assert size["cache_bytes"] >= size["shard_bytes_per_image"] * size["images"]
    assert json.loads((out / "scale.json").read_text()) == [size] and not (out / "x2").exists()
