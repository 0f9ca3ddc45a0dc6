import numpy as np
import pytest
import torch

from data_prep.augment import (
    AugmentConfig,
    ShardDataset,
    eval_transform,
    make_loader,
    normalize,
    train_transform,
)
from data_prep.camvid import Pair, find_pairs, load_pair
from segnet import SegNetError


@pytest.fixture(scope="module")
def sample(camvid_dir):
    return load_pair(find_pairs(camvid_dir, limit=1)["train"][0])


def test_train_transform_keeps_labels_nearest_and_pads_with_void(sample):
    t = train_transform(AugmentConfig(120, 160, scale_min=0.5, scale_max=0.6), seed=3, void=11)
    out = t(image=sample["image"], mask=sample["label"])
    assert out["image"].shape == (120, 160, 3) and out["mask"].shape == (120, 160)
    allowed = set(np.unique(sample["label"]).tolist()) | {11}
    assert set(np.unique(out["mask"]).tolist()) <= allowed  # no value invented by interpolation
    assert (out["mask"] == 11).any()  # downscaled below the crop size: padding is void


def test_train_transform_is_reproducible_by_seed(sample):
    cfg = AugmentConfig(90, 120)
    a = [train_transform(cfg, seed=7, void=11)(image=sample["image"], mask=sample["label"]) for _ in range(2)]
    b = train_transform(cfg, seed=8, void=11)(image=sample["image"], mask=sample["label"])
    assert np.array_equal(a[0]["image"], a[1]["image"]) and np.array_equal(a[0]["mask"], a[1]["mask"])
    assert not np.array_equal(a[0]["image"], b["image"])


def test_eval_transform_resizes_image_and_label(sample):
    out = eval_transform(180, 240)(image=sample["image"], mask=sample["label"])
    assert out["image"].shape == (180, 240, 3)
    assert np.array_equal(out["mask"], sample["label"][::2, ::2])  # nearest neighbour on a 2x grid


def test_normalize_standardises_a_uint8_batch():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert y[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)


@pytest.mark.slow
def test_loader_batches_are_reproducible_with_workers(small_camvid, ray_local, tmp_path):
    from data_prep import prepare

    prepare(small_camvid, tmp_path / "out", shard_size=1)

    def first_batch(seed):
        ds = ShardDataset(
            tmp_path / "out", "train", train_transform(AugmentConfig(64, 96), seed=seed, void=11)
        )
        loader = make_loader(ds, batch_size=2, shuffle=True, seed=seed, num_workers=2)
        return next(iter(loader))

    (x1, y1), (x2, y2), (x3, _) = first_batch(0), first_batch(0), first_batch(1)
    assert x1.shape == (2, 3, 64, 96) and x1.dtype == torch.uint8 and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_bad_size_string_is_a_clear_error():
    from data_prep.augment import parse_size

    assert parse_size("360x480") == (360, 480)
    with pytest.raises(SegNetError, match="HEIGHTxWIDTH"):
        parse_size("360by480")


def test_pair_loader_rejects_a_text_file(tmp_path, camvid_dir):
    fake = tmp_path / "x.png"
    fake.write_text("not an image")
    label = next((camvid_dir / "trainannot").iterdir())
    with pytest.raises(SegNetError, match="x.png is not a readable PNG"):
        load_pair(Pair("train", "x", str(fake), str(label), False))
