"""Albumentations pipelines and the torch input path for training and evaluation."""

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data_prep.device_augment import MEAN, STD, AugmentConfig, normalize
from data_prep.shards import ShardReader
from segnet.errors import SegNetError

__all__ = ["MEAN", "STD", "AugmentConfig", "normalize"]  # defined with the device-side path


def parse_size(text: str) -> tuple[int, int]:
    """'360x480' -> (360, 480)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise SegNetError(f"image size {text!r} is not HEIGHTxWIDTH, e.g. 360x480") from e
    if h < 1 or w < 1:
        raise SegNetError(f"image size {text!r} must be positive")
    return h, w


def train_transform(cfg: AugmentConfig, seed: int | None = None, *, void: int) -> A.Compose:
    """Random scale, crop to the training size (padding `void`, K for K classes), flip, photometric jitter.

    Labels follow with nearest-neighbour interpolation, and padding is void, so no class is invented.
    Scaling is relative to the training size, so a reduced-resolution run sees the same field of view.
    """
    steps = [
        A.RandomScale(scale_limit=(cfg.scale_min - 1, cfg.scale_max - 1), p=1.0),
        A.PadIfNeeded(cfg.height, cfg.width, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=void),
        A.RandomCrop(cfg.height, cfg.width),
        A.HorizontalFlip(p=cfg.hflip),
    ]
    if cfg.jitter > 0:
        j = cfg.jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=0.8))
    return A.Compose(
        [A.Resize(cfg.height, cfg.width, mask_interpolation=cv2.INTER_NEAREST)] + steps,
        mask_interpolation=cv2.INTER_NEAREST,
        seed=seed,
    )


def eval_transform(height: int | None = None, width: int | None = None) -> A.Compose:
    """Resize to the evaluation size, or keep the image as it is."""
    steps = [] if height is None else [A.Resize(height, width, mask_interpolation=cv2.INTER_NEAREST)]
    return A.Compose(steps)


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HxWx3 -> uint8 3xHxW; uint8 HxW -> int64 HxW. Kept uint8 so loader workers move a quarter of
    the bytes; `normalize` turns the batch into floats on the training device."""
    # Samples read straight from a memory-mapped shard are read-only: copy those, and only those.
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).contiguous()
    return x, torch.from_numpy(np.require(label, requirements=["C", "W"])).long()


class ShardDataset(Dataset):
    """A split of the shards as a torch Dataset, augmented per sample.

    With `resize_label=False` only the image is transformed: evaluation scores full-resolution labels.
    `manifest`: the shards' manifest, if the caller has read it already.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        transform: A.Compose | None = None,
        resize_label: bool = True,
        verify: bool = True,
        manifest: dict | None = None,
    ):
        self.reader = ShardReader(shard_dir, split, verify=verify, manifest=manifest)
        self.transform = transform
        self.resize_label = resize_label

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.reader[i]
        image, label = s["image"], s["label"]
        if self.transform is not None and self.resize_label:
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        elif self.transform is not None:
            image = self.transform(image=image)["image"]
        return to_tensors(image, label)


def _seed_worker(worker_id: int) -> None:
    """Each loader worker gets its own augmentation stream, derived from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    t = info.dataset.transform
    if t is not None:
        t.set_random_seed(info.seed % 2**32)


def make_loader(
    dataset: ShardDataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader whose workers augment while the model trains; sharded by rank under DDP."""
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    g = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
        generator=g,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
    )


def eval_loader(
    shard_dir: str, split: str, size, batch_size: int, rank=0, world=1, workers=0, manifest=None
) -> DataLoader:
    """Every `world`-th sample from `rank` on, no padding: summed over ranks, each sample counts once.
    `manifest`: the shards' manifest, if the caller has read it already."""
    transform = eval_transform(*size)
    ds = ShardDataset(shard_dir, split, transform, resize_label=False, verify=False, manifest=manifest)
    part = torch.utils.data.Subset(ds, range(rank, len(ds), world))
    return DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=collate_eval)


def collate_eval(batch):
    """Images (all at the evaluation size) stacked; labels stacked when they share a size, else a list:
    each label of a split of mixed sizes is scored at its own size."""
    images, labels = torch.stack([x for x, _ in batch]), [y for _, y in batch]
    return images, torch.stack(labels) if len({y.shape for y in labels}) == 1 else labels
