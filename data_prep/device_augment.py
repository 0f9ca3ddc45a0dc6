"""The device-side input path: a split held as uint8 tensors on the training device, augmented there.

The CPU path (albumentations in DataLoader workers, `data_prep.augment`) delivers a few hundred samples/s
per core; a GPU trains segnet at about 500 images/s. Here every sample of a batch is scaled, cropped,
flipped and resampled by one `grid_sample` call on the device, then colour-jittered and normalised, so no
CPU work stands between two steps. The transform is the one `augment.train_transform` describes: random
scale of the training size, void-padded crop, horizontal flip, brightness/contrast/saturation jitter.
This module imports neither albumentations nor Ray, so it runs on a bare GPU machine.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segnet.errors import SegNetError

# ImageNet statistics: the VGG16 encoder SegNet starts from was trained on them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    height: int = 360
    width: int = 480
    scale_min: float = 0.75
    scale_max: float = 1.5
    hflip: float = 0.5
    jitter: float = 0.2  # brightness / contrast / saturation strength; 0 turns photometric jitter off


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) batch -> float, scaled to [0, 1] and standardised with ImageNet statistics."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _crop_grid(n: int, cfg: AugmentConfig, g: torch.Generator, device) -> torch.Tensor:
    """Sampling grid of each sample's random scale, crop (centred void padding when the scaled image is
    smaller than the crop, as albumentations' PadIfNeeded) and flip, in align_corners=False coordinates.
    Drawn on the device with a device generator: no host-device copy, so no synchronisation."""
    scale = torch.empty(n, device=device).uniform_(cfg.scale_min, cfg.scale_max, generator=g)
    rows = []
    for size in (cfg.width, cfg.height):  # theta row 0 is x (width), row 1 is y
        scaled = scale * size
        spare = scaled - size  # > 0: crop offset drawn in [0, spare]; < 0: centred padding of -spare
        draw = torch.rand(n, generator=g, device=device)
        offset = torch.where(spare > 0, draw * spare.clamp(min=0), spare / 2)
        rows.append((1 / scale, 1 / scale - 1 + 2 * offset / scaled))
    flip = torch.rand(n, generator=g, device=device) < cfg.hflip
    (sx, tx), (sy, ty) = rows
    zero = torch.zeros_like(scale)
    theta = torch.stack(
        [torch.stack([torch.where(flip, -sx, sx), zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1
    )
    return F.affine_grid(theta, [n, 1, cfg.height, cfg.width], align_corners=False)


def _jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], each sample with probability 0.8
    (float images in [0, 1])."""
    n = len(x)

    def factors():
        f = 1 + (torch.rand(n, generator=g, device=x.device) * 2 - 1) * strength
        f = torch.where(torch.rand(n, generator=g, device=x.device) < 0.8, f, torch.ones_like(f))
        return f.view(n, 1, 1, 1)

    gray = lambda t: 0.299 * t[:, :1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3]  # noqa: E731
    x = x * factors()
    x = (x - gray(x).mean((2, 3), keepdim=True)) * factors() + gray(x).mean((2, 3), keepdim=True)
    x = (x - gray(x)) * factors() + gray(x)
    return x.clamp(0, 1)


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, g: torch.Generator, void: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) images and (N, H, W) labels on any device -> normalised float images and int64
    labels of the training size, augmented per sample. Labels are resampled by nearest neighbour and
    padding is `void` (K, the dataset's void index), so no class is invented. `g` is a generator on the
    images' device."""
    grid = _crop_grid(len(images), cfg, g, images.device)
    x = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    shifted = labels[:, None].float() + 1  # 0 = outside the image, after the shift
    y = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    y = (y.round().long() - 1).masked_fill_(y < 0.5, void)
    if cfg.jitter > 0:
        x = _jitter(x, cfg.jitter, g)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std, y


def resize_batch(images: torch.Tensor, size) -> torch.Tensor:
    """Evaluation input: uint8 (N, 3, H, W) -> normalised float at `size` (labels stay at full size)."""
    x = normalize(images)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


class DeviceBatches:
    """A whole split resident on the device as uint8, yielding (normalised images, labels) batches.

    Training (`augment` set): shuffled every epoch (`set_epoch`), each DDP rank its own equal part, as
    DistributedSampler does, augmented on the device. Evaluation: in order, rank r taking every
    `world`-th sample, no padding, images resized to `size` and labels left at full resolution.
    CamVid's 367 training images take 254 MB at 360x480."""

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        size,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
        device="cpu",
        void: int | None = None,
    ):
        images = torch.as_tensor(np.asarray(images))
        self.ragged = isinstance(labels, list) and augment is None  # evaluation's labels, each its own size
        if not self.ragged:
            labels = torch.as_tensor(np.asarray(labels))
        label_shapes = len(labels) == len(images) if self.ragged else labels.shape == images.shape[:3]
        if images.ndim != 4 or images.shape[-1] != 3 or not label_shapes:
            got = len(labels) if self.ragged else tuple(labels.shape)
            raise SegNetError(
                f"device batches need images (N, H, W, 3) and labels (N, H, W) of one size, got "
                f"{tuple(images.shape)} and {got}"
            )
        self.labels = [torch.as_tensor(y).to(device) for y in labels] if self.ragged else labels.to(device)
        self.images = images.to(device).permute(0, 3, 1, 2).contiguous()
        self.batch_size, self.size, self.augment = batch_size, tuple(size), augment
        self.seed, self.rank, self.world, self.drop_last = seed, rank, world, drop_last
        self.epoch, self.void = 0, void
        if augment is not None and void is None:
            raise SegNetError("augmented device batches need the dataset's void index (void=K) to pad with")

    @classmethod
    def from_shards(
        cls, shard_dir, split: str, batch_size: int, size, manifest: dict | None = None, **kw
    ) -> "DeviceBatches":
        """Read a split of the shards (already verified) into memory, then onto the device; `manifest`,
        if the caller has read it already."""
        import cv2

        from data_prep.shards import ShardReader, dataset_of

        reader = ShardReader(shard_dir, split, verify=False, manifest=manifest)
        kw.setdefault("void", dataset_of(reader.manifest).void_index)
        samples = [reader[i] for i in range(len(reader))]
        if len({s["label"].shape for s in samples}) == 1:
            images, labels = np.stack([s["image"] for s in samples]), np.stack([s["label"] for s in samples])
            return cls(images, labels, batch_size, size, **kw)
        # Mixed sizes: each image is brought to the training size here, once, as the loader path's first
        # step does per sample; training labels follow (nearest), evaluation's stay at their own size.
        h, w = size
        images = np.stack([cv2.resize(s["image"], (w, h), interpolation=cv2.INTER_LINEAR) for s in samples])
        if kw.get("augment") is None:
            return cls(images, [s["label"] for s in samples], batch_size, size, **kw)
        labels = np.stack([cv2.resize(s["label"], (w, h), interpolation=cv2.INTER_NEAREST) for s in samples])
        return cls(images, labels, batch_size, size, **kw)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.images)
        if self.augment is None:
            return torch.arange(self.rank, n, self.world)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        per_rank = n // self.world
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self._order().to(self.images.device)
        g = torch.Generator(device=self.images.device)
        g.manual_seed(1_000_003 * (self.seed + 1) + 7919 * self.epoch + self.rank)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.images[idx]
            if self.ragged:
                yield resize_batch(images, self.size), [self.labels[i].long() for i in idx.tolist()]
                continue
            labels = self.labels[idx]
            if self.augment is not None:
                yield augment_batch(images, labels, self.augment, g, self.void)
            else:
                yield resize_batch(images, self.size), labels.long()


def device_budget(device, budget_bytes: int | None = None, share: float = 0.5) -> tuple[int, str]:
    """(bytes the input path may hold on `device`, where that figure comes from): `budget_bytes` when
    given, else `share` of the free device memory (a GPU) or of the available RAM (the CPU)."""
    if budget_bytes is not None:
        return int(budget_bytes), "the budget given"
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(share * free), f"{share:.0%} of the free device memory"
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(share * free), f"{share:.0%} of the available RAM"


def device_batches(
    shard_dir,
    split: str,
    batch_size: int,
    size,
    placement: str = "auto",
    budget_bytes: int | None = None,
    budget_share: float = 0.5,
    log=print,
    **kw,
):
    """A split's batches on the device: resident (`DeviceBatches`) when it fits the budget, else streamed
    chunk by chunk (`StreamedBatches`). `placement` "resident" or "streamed" forces one; the choice and
    its reason are logged in one line. `kw`: augment, seed, rank, world, drop_last, device."""
    from data_prep.shards import ShardReader, dataset_of

    if placement not in PLACEMENTS:
        raise SegNetError(f"unknown device placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
    manifest = kw.pop("manifest", None)
    reader = ShardReader(shard_dir, split, verify=False, manifest=manifest)
    first = reader[0]["label"]
    need = len(reader) * first.size * 4  # 3 bytes of image and 1 of label per pixel
    budget, source = device_budget(kw.get("device", "cpu"), budget_bytes, budget_share)
    fits = need <= budget
    chosen = placement if placement != "auto" else ("resident" if fits else "streamed")
    why = "forced" if placement != "auto" else ("fits" if fits else "does not fit")
    log(
        f"device input, {split}: {len(reader)} images = {need / 1e6:,.0f} MB {why} "
        f"{'in ' if why == 'forced' else ''}the budget of {budget / 1e6:,.0f} MB ({source}): {chosen}"
    )
    if chosen == "resident":
        return DeviceBatches.from_shards(shard_dir, split, batch_size, size, manifest=manifest, **kw)
    rows = [s["rows"] for s in reader.manifest["splits"][split]["shards"]]
    kw.setdefault("void", dataset_of(reader.manifest).void_index)
    return StreamedBatches(reader, rows, batch_size, size, budget, **kw)


PLACEMENTS = ("auto", "resident", "streamed")


class StreamedBatches:
    """A split too large for the device, streamed to it in chunks, with the batches of `DeviceBatches`.

    `samples[i]` is a dict with `image` (H, W, 3) and `label` (H, W) uint8 (a `ShardReader`); `shards` the
    rows of each shard, in order. Two chunks of at most budget / 2 bytes each are on the device at a time:
    the one being trained on and the next, assembled in pinned host memory by a background thread and
    copied on a side CUDA stream (on the CPU: plain memory, no stream).

    Training order: every epoch the shards are shuffled (seed + epoch) and concatenated; rank r takes the
    r-th of `world` equal, contiguous parts (n // world samples, as DistributedSampler), so ranks are
    disjoint, cover the split but for n % world samples, and read whole shards; each chunk of a part is
    shuffled within. A batch thus mixes the samples of chunk / shard-size shards drawn at random, not the
    whole split: docs/scaling.md measures what that costs. Evaluation: in order, rank r taking every
    `world`-th sample, as `DeviceBatches`, so its batches are the resident path's."""

    def __init__(
        self,
        samples,
        shards: list[int],
        batch_size: int,
        size,
        budget_bytes: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
        device="cpu",
        void: int | None = None,
    ):
        if augment is not None and void is None:
            raise SegNetError("augmented device batches need the dataset's void index (void=K) to pad with")
        if sum(shards) != len(samples):
            raise SegNetError(f"shards of {sum(shards)} rows for {len(samples)} samples")
        self.samples, self.shards = samples, shards
        self.batch_size, self.size, self.augment = batch_size, tuple(size), augment
        self.seed, self.rank, self.world, self.drop_last = seed, rank, world, drop_last
        self.device, self.epoch, self.void = torch.device(device), 0, void
        h, w = samples[0]["label"].shape
        per_chunk = budget_bytes // 2 // (h * w * 4) // batch_size * batch_size
        if per_chunk < batch_size:
            raise SegNetError(
                f"a device budget of {budget_bytes:,} bytes holds no two chunks of one batch "
                f"({batch_size} images of {h}x{w}); raise the budget or lower the batch size"
            )
        self.chunk_samples, self.shape = per_chunk, (h, w)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.samples)
        if self.augment is None:
            return torch.arange(self.rank, n, self.world)
        starts = np.cumsum([0, *self.shards])
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        shard_order = torch.randperm(len(self.shards), generator=g).tolist()
        order = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in shard_order])
        per_rank = n // self.world
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _chunks(self) -> list[torch.Tensor]:
        order = self._order()
        chunks = list(order.split(self.chunk_samples))
        if self.augment is not None:  # shuffled within each chunk
            g = torch.Generator().manual_seed(7_777_777 + 1009 * self.seed + self.epoch)
            chunks = [c[torch.randperm(len(c), generator=g)] for c in chunks]
        return chunks

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _load(self, idx: torch.Tensor, slot: dict):
        """One chunk onto the device: gathered into (pinned) host memory, then copied (on a side stream)."""
        n, (h, w) = len(idx), self.shape
        cuda = self.device.type == "cuda"
        if slot.get("event") is not None:
            slot["event"].synchronize()  # the last copy out of this host buffer has finished
        if "images" not in slot or len(slot["images"]) < n:
            slot["images"] = torch.empty((n, h, w, 3), dtype=torch.uint8, pin_memory=cuda)
            slot["labels"] = torch.empty((n, h, w), dtype=torch.uint8, pin_memory=cuda)
        images, labels = slot["images"][:n], slot["labels"][:n]
        for j, i in enumerate(idx.tolist()):
            s = self.samples[i]
            if s["label"].shape != (h, w):
                raise SegNetError(
                    f"sample {i} is {s['label'].shape[0]}x{s['label'].shape[1]}, not {h}x{w}: the device "
                    "input path needs one size; use --input loader"
                )
            images[j].numpy()[:] = s["image"]  # one copy, out of the memory-mapped shard
            labels[j].numpy()[:] = s["label"]
        if not cuda:
            return images.permute(0, 3, 1, 2).contiguous(), labels.clone(), None
        stream = slot.setdefault("stream", torch.cuda.Stream(self.device))
        with torch.cuda.stream(stream):
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            y = labels.to(self.device, non_blocking=True)
            slot["event"] = torch.cuda.Event()
            slot["event"].record(stream)
        return x, y, slot["event"]

    def __iter__(self):
        chunks = self._chunks()
        g = torch.Generator(device=self.device)
        g.manual_seed(1_000_003 * (self.seed + 1) + 7919 * self.epoch + self.rank)
        left = len(self)
        slots = [{}, {}]
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(self._load, chunks[0], slots[0]) if chunks else None
            for k in range(len(chunks)):
                images, labels, event = ahead.result()
                if k + 1 < len(chunks):
                    ahead = pool.submit(self._load, chunks[k + 1], slots[(k + 1) % 2])
                if event is not None:  # the training stream waits for the copy, and owns the chunk
                    torch.cuda.current_stream(self.device).wait_event(event)
                    images.record_stream(torch.cuda.current_stream(self.device))
                    labels.record_stream(torch.cuda.current_stream(self.device))
                for b in range(0, len(images), self.batch_size):
                    if left == 0:
                        break
                    x, y = images[b : b + self.batch_size], labels[b : b + self.batch_size]
                    left -= 1
                    if self.augment is not None:
                        yield augment_batch(x, y, self.augment, g, self.void)
                    else:
                        yield resize_batch(x, self.size), y.long()
