import numpy as np
import pytest
import torch

from data_prep.compact import read_compact, write_compact
from data_prep.datasets import CAMVID
from data_prep.device_augment import AugmentConfig, DeviceBatches, augment_batch, normalize
from segnet import SegNetError

VOID = CAMVID.void_index


@pytest.fixture(scope="module")
def compact(camvid_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compact")
    write_compact(camvid_dir, out, limit=4)
    return out


@pytest.fixture(scope="module")
def split(compact):
    return read_compact(compact, "train")


def test_compact_copy_keeps_labels_exact_and_images_close(compact, camvid_dir):
    from data_prep.camvid import find_pairs, load_pair

    images, labels = read_compact(compact, "train")
    originals = [load_pair(p) for p in find_pairs(camvid_dir, limit=4)["train"]]
    assert images.shape == (4, 360, 480, 3) and labels.shape == (4, 360, 480)
    for image, label, original in zip(images, labels, originals):
        assert np.array_equal(label, original["label"])  # labels are exact
        diff = np.abs(image.astype(int) - original["image"].astype(int)).mean()
        assert 0 < diff < 3  # re-encoded as JPEG: close, not equal


def _batch(split, n=2):
    images, labels = split
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels[:n])


def test_identity_settings_give_the_normalised_image_and_the_exact_labels(split):
    x, y = _batch(split)
    cfg = AugmentConfig(360, 480, scale_min=1, scale_max=1, hflip=0, jitter=0)
    out_x, out_y = augment_batch(x, y, cfg, torch.Generator().manual_seed(0), VOID)
    assert torch.equal(out_y, y.long())
    assert torch.allclose(out_x, normalize(x), atol=1e-4)


def test_flip_mirrors_image_and_labels_together(split):
    x, y = _batch(split)
    cfg = AugmentConfig(360, 480, scale_min=1, scale_max=1, hflip=1, jitter=0)
    out_x, out_y = augment_batch(x, y, cfg, torch.Generator().manual_seed(0), VOID)
    assert torch.equal(out_y, y.long().flip(-1))
    assert torch.allclose(out_x, normalize(x).flip(-1), atol=1e-4)


def test_zoom_out_pads_with_void_and_invents_no_class(split):
    x, y = _batch(split)
    cfg = AugmentConfig(360, 480, scale_min=0.5, scale_max=0.5, hflip=0, jitter=0)
    _, out_y = augment_batch(x, y, cfg, torch.Generator().manual_seed(0), VOID)
    assert (out_y[:, :80] == VOID).all() and (out_y[:, :, :110] == VOID).all()  # 90 / 120 px of padding
    inner = out_y[:, 100:260, 130:350]
    assert (inner != VOID).float().mean() > 0.9
    for i in range(len(y)):
        assert set(out_y[i].unique().tolist()) <= set(y[i].unique().tolist()) | {VOID}


def test_training_batches_are_reproducible_per_epoch_and_differ_across_epochs(split):
    images, labels = split

    def make():
        return DeviceBatches(images, labels, 2, (90, 120), augment=AugmentConfig(90, 120), seed=1, void=VOID)

    a, b = make(), make()
    first = [x for x, _ in a]
    assert all(torch.equal(p, q) for p, q in zip(first, (x for x, _ in b)))
    a.set_epoch(1)
    assert not all(torch.equal(p, q) for p, q in zip(first, (x for x, _ in a)))
    x, y = first[0], next(iter(b))[1]
    assert x.shape == (2, 3, 90, 120) and x.dtype == torch.float32 and y.shape == (2, 90, 120)


def test_ranks_take_disjoint_equal_parts_of_each_epoch():
    n = 10
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)
    labels = np.zeros((n, 8, 8), dtype=np.uint8)
    cfg = AugmentConfig(8, 8, scale_min=1, scale_max=1, hflip=0, jitter=0)
    seen = []
    for rank in range(3):
        batches = DeviceBatches(
            images, labels, 2, (8, 8), augment=cfg, rank=rank, world=3, drop_last=True, void=VOID
        )
        batches.set_epoch(4)
        ids = [round(v) for x, _ in batches for v in (x[:, 0, 0, 0] * 0.229 + 0.485).mul(255).tolist()]
        assert len(ids) == 2  # 10 // 3 = 3 per rank, one full batch of 2
        seen += ids
    assert len(set(seen)) == len(seen)


def test_evaluation_batches_resize_images_and_keep_full_labels(split):
    images, labels = split
    batches = DeviceBatches(images, labels, 3, (90, 120))
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in batches]
    assert shapes == [((3, 3, 90, 120), (3, 360, 480)), ((1, 3, 90, 120), (1, 360, 480))]


def test_mixed_sizes_are_refused_with_the_shapes():
    with pytest.raises(SegNetError, match="device batches need"):
        DeviceBatches(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 5), np.uint8), 1, (4, 4))
