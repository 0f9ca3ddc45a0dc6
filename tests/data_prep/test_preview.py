"""preview.png of a described dataset: overlaid samples under its legend, and class shares per split."""

import numpy as np
from PIL import Image

from data_prep.datasets import find_pairs, read_description
from data_prep.preview import overlay, pixel_shares, write_preview
from tests.data_prep.test_datasets import make_generic


def test_overlay_colours_classes_and_leaves_void_as_the_image(tmp_path):
    make_generic(tmp_path, "color")
    dataset = read_description(tmp_path / "dataset.yaml")
    image = np.full((1, 4, 3), 100, np.uint8)
    out = overlay(image, np.array([[0, 1, 2, 3]], np.uint8), dataset)
    assert out[0, 0, 0] > 100 and out[0, 0, 1] < 100  # crack is red
    assert out[0, 2, 2] > 100 and out[0, 2, 0] < 100  # paint is blue
    assert (out[0, 3] == 100).all()  # void: the image alone


def test_pixel_shares_are_percent_of_each_split():
    manifest = {
        "splits": {"train": {"class_pixel_counts": [1, 3, 0, 0]}, "val": {"class_pixel_counts": [0] * 4}}
    }
    shares = pixel_shares(manifest)
    assert shares["train"].tolist() == [25, 75, 0, 0] and shares["val"].tolist() == [0] * 4


def test_preview_is_a_png_of_a_readable_size(tmp_path):
    make_generic(tmp_path / "src", "color")
    dataset = read_description(tmp_path / "src" / "dataset.yaml")
    pairs = find_pairs(dataset, tmp_path / "src")
    counts = {"class_pixel_counts": [10, 20, 30, 5], "num_images": 2}
    manifest = {"splits": {split: counts for split in pairs}}
    written = write_preview(str(tmp_path / "shards"), dataset, pairs, manifest)
    with Image.open(written) as png:
        assert png.format == "PNG" and 800 <= png.width <= 4000 and 500 <= png.height <= 3000
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["preview.png"]  # no temporary left
