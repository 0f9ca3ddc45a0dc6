"""The registered model's labels at any image size without full-size float logits: the same labels as
upsampling the logits whole (on real CamVid), and a peak memory bounded by the image's pixels."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.tracking.pyfunc_model import SegNetModel
from segnet import build_model
from segnet.layers import fold_batch_norm

CAMVID = Path(__file__).parents[2] / "../shared/camvid"


def seeded_model(seed: int = 1) -> SegNetModel:
    """The pyfunc as load_context makes it, with a seeded SegNet-Basic at 90x120 (no artifacts needed)."""
    torch.manual_seed(seed)
    m = SegNetModel()
    m.device = torch.device("cpu")
    m.model = fold_batch_norm(build_model("segnet-basic", num_classes=11).eval())
    m.model = m.model.to(memory_format=torch.channels_last)
    m.dropout = False
    m.meta = {"config": {"model": "segnet-basic"}}
    m.size = (90, 120)
    m.mean = torch.tensor([0.39, 0.40, 0.41]).view(1, 3, 1, 1)
    m.std = torch.tensor([0.30, 0.31, 0.30]).view(1, 3, 1, 1)
    return m


@torch.no_grad()
def full_size_labels(m: SegNetModel, image: np.ndarray) -> np.ndarray:
    """The labels as the code before bands computed them: normalised, resized, run, the logits of all
    classes resized to the image's size, then argmax."""
    x = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255)[None]
    x = F.interpolate((x - m.mean) / m.std, size=m.size, mode="bilinear", align_corners=False)
    logits = m.model(x.contiguous(memory_format=torch.channels_last))
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).numpy()


def agreement(count: int, camvid: Path | None = None) -> float:
    """Share of pixels of the first `count` CamVid test images on which both ways agree."""
    m = seeded_model()
    camvid = camvid or Path(__import__("os").environ.get("CAMVID_DIR", CAMVID))
    same = total = 0
    for path in sorted((camvid / "test").glob("*.png"))[:count]:
        image = np.asarray(Image.open(path).convert("RGB"))
        ours = m.predict(None, [image])[0]
        same += int((ours == full_size_labels(m, image)).sum())
        total += ours.size
    return same / total


def test_labels_from_logits_in_bands_agree_with_full_size_logits_on_camvid(camvid_dir):
    assert agreement(6, camvid_dir) >= 0.99


def test_labels_of_a_non_camvid_size_and_of_a_float_batch_agree_too():
    m = seeded_model(3)
    image = np.random.default_rng(0).integers(0, 256, (333, 517, 3), dtype=np.uint8)
    ours = m.predict(None, [image])[0]
    assert ours.shape == (333, 517) and (ours == full_size_labels(m, image)).mean() >= 0.99
    batch = np.stack([image.transpose(2, 0, 1).astype(np.float32) / 255] * 2)
    assert all(np.array_equal(labels, ours) for labels in m.predict(None, [batch]))


MEASURE = """
import io, resource, sys
import numpy as np
from PIL import Image
from tests.pipelines.test_model_memory import seeded_model
m = seeded_model()
m.predict(None, [np.zeros((90, 120, 3), np.uint8)])
out = io.BytesIO()
Image.new("RGB", (int(sys.argv[1]), int(sys.argv[2])), (90, 120, 30)).save(out, format="PNG")
data = out.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = m.predict(None, [data])[0]
assert labels.shape == (int(sys.argv[2]), int(sys.argv[1]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow  # not Ray, but 10 to 50 s of one core
def test_the_peak_memory_of_a_large_image_is_bounded_by_its_pixels():
    """docs/serving.md (Memory per request): about 7 bytes per pixel and 150 MB; the code before took 65
    bytes per pixel (585 MB here)."""
    width, height = 3000, 3000
    root = Path(__file__).parents[2]
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, str(width), str(height)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        check=True,
    )
    growth = int(r.stdout.split()[-1])
    assert growth < 10 * width * height + 200 * 2**20, f"{growth / 2**20:.0f} MB"
