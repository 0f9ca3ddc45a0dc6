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
