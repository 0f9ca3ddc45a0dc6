import numpy as np
from PIL import Image

from data_prep.datasets import CAMVID
from pipelines.core.plots import save_overlay


def test_overlay_carries_a_legend_with_every_class_colour(tmp_path):
    image = np.full((60, 80, 3), 200, np.uint8)
    label = np.zeros((60, 80), np.uint8)
    out = np.asarray(Image.open(save_overlay(image, label, label, tmp_path / "o.png", CAMVID)).convert("RGB"))
    assert out.shape[1] == 3 * 80 and out.shape[0] > 60  # three panels above a legend strip
    strip = out[60:].reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(strip, axis=0)}
    assert all(tuple(int(v) for v in c) in colours for c in CAMVID.palette)
