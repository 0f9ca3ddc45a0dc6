"""The streamed device input path: a split larger than the device budget, in chunks (on the CPU)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from data_prep.device_augment import AugmentConfig, DeviceBatches, StreamedBatches, device_batches
from data_prep.shards import MANIFEST, SCHEMA, SCHEMA_VERSION, sha256_file
from segnet import SegNetError

N, SIDE = 60, 8
SAMPLE_BYTES = SIDE * SIDE * 4
IDENTITY = AugmentConfig(SIDE, SIDE, scale_min=1, scale_max=1, hflip=0, jitter=0)


def samples(n=N):
    """Sample i's image holds i in every pixel, so a batch says which samples it holds."""
    return [
        {"image": np.full((SIDE, SIDE, 3), i, np.uint8), "label": np.full((SIDE, SIDE), i % 3, np.uint8)}
        for i in range(n)
    ]


def ids(x: torch.Tensor) -> list[int]:
    return [round(v) for v in (x[:, 0, 0, 0] * 0.229 + 0.485).mul(255).tolist()]


def streamed(budget=10 * SAMPLE_BYTES, shards=(8,) * 7 + (4,), **kw):
    return StreamedBatches(samples(), list(shards), 4, (SIDE, SIDE), budget, **{"void": 11, **kw})


def test_every_sample_is_seen_once_per_epoch_in_several_chunks():
    batches = streamed(augment=IDENTITY)
    assert batches.chunk_samples == 4  # 10 samples' budget: two chunks of 4 (a whole batch each)
    for epoch in range(3):
        batches.set_epoch(epoch)
        seen = [i for x, _ in batches for i in ids(x)]
        assert sorted(seen) == list(range(N))
    batches.set_epoch(0)
    first = [i for x, _ in batches for i in ids(x)]
    batches.set_epoch(1)
    assert first != [i for x, _ in batches for i in ids(x)]  # reshuffled every epoch


def test_ranks_take_disjoint_equal_parts_that_cover_the_split():
    seen = []
    for rank in range(3):
        batches = streamed(budget=24 * SAMPLE_BYTES, augment=IDENTITY, rank=rank, world=3, drop_last=True)
        batches.set_epoch(2)
        part = [i for x, _ in batches for i in ids(x)]
        assert len(part) == len(batches) * 4 == 20  # 60 // 3, five full batches
        seen += part
    assert sorted(seen) == list(range(N))


def test_a_rank_reads_whole_shards_in_a_shuffled_order():
    batches = streamed(budget=1000 * SAMPLE_BYTES, shards=(10,) * 6, augment=IDENTITY, rank=1, world=2)
    part = [i for x, _ in batches for i in ids(x)]
    assert len({i // 10 for i in part}) == 3  # 30 samples from 3 of the 6 shards of 10
    assert part != sorted(part)  # shuffled within the chunk


def test_evaluation_batches_are_the_resident_paths():
    data = samples()
    images = np.stack([s["image"] for s in data])
    labels = np.stack([s["label"] for s in data])
    for rank, world in ((0, 1), (1, 2)):
        resident = DeviceBatches(images, labels, 4, (SIDE, SIDE), rank=rank, world=world)
        stream = streamed(rank=rank, world=world)
        pairs = list(zip(resident, stream, strict=True))
        assert len(pairs) == len(resident) == len(stream)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


def test_a_budget_without_room_for_a_batch_is_refused():
    with pytest.raises(SegNetError, match="holds no two chunks of one batch"):
        streamed(budget=7 * SAMPLE_BYTES)


def write_shards(folder, rows=(8, 8, 4), data=None):
    """A split `train` of synthetic samples (`data`, default `samples`) as shards + manifest, without Ray."""
    data, shards, start = data or samples(sum(rows)), [], 0
    for k, n in enumerate(rows):
        file = f"train-{k:05d}.arrow"
        with ipc.new_file(str(folder / file), SCHEMA) as writer:
            for s in data[start : start + n]:
                h, w = s["label"].shape
                columns = [["x"], [s["image"].tobytes()], [s["label"].tobytes()], [h], [w], [""], [""]]
                writer.write_batch(pa.record_batch(columns, schema=SCHEMA))
        shards.append({"file": file, "rows": n, "sha256": sha256_file(folder / file)})
        start += n
    manifest = {"schema_version": SCHEMA_VERSION, "splits": {"train": {"shards": shards}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_auto_streams_a_split_over_the_budget_and_says_why(tmp_path):
    folder, lines = write_shards(tmp_path), []
    over = device_batches(folder, "train", 4, (SIDE, SIDE), budget_bytes=10 * SAMPLE_BYTES, log=lines.append)
    fits = device_batches(folder, "train", 4, (SIDE, SIDE), budget_bytes=20 * SAMPLE_BYTES, log=lines.append)
    assert isinstance(over, StreamedBatches) and isinstance(fits, DeviceBatches)
    assert "does not fit" in lines[0] and lines[0].endswith(": streamed")
    assert "fits" in lines[1] and lines[1].endswith(": resident")
    assert sorted(i for x, _ in over for i in ids(x)) == list(range(20))


def test_a_resident_split_of_mixed_sizes_trains_at_the_training_size_and_is_scored_at_its_own(tmp_path):
    """Images of two sizes: training batches come at the training size (labels resized by nearest
    neighbour, every sample once an epoch); evaluation batches give each label at its own size, as a list."""
    sizes = [(8, 8), (12, 10)] * 3
    data = [
        {"image": np.full((h, w, 3), i, np.uint8), "label": np.full((h, w), i % 3, np.uint8)}
        for i, (h, w) in enumerate(sizes)
    ]
    write_shards(tmp_path, rows=(6,), data=data)
    train = DeviceBatches.from_shards(tmp_path, "train", 2, (SIDE, SIDE), augment=IDENTITY)
    batches = list(train)
    assert all(x.shape == (2, 3, SIDE, SIDE) and y.shape == (2, SIDE, SIDE) for x, y in batches)
    assert sorted(i for x, _ in batches for i in ids(x)) == list(range(6))
    assert all((y == torch.tensor(ids(x))[:, None, None] % 3).all() for x, y in batches)
    val = list(DeviceBatches.from_shards(tmp_path, "train", 4, (SIDE, SIDE)))
    assert [x.shape[-2:] for x, _ in val] == [(SIDE, SIDE)] * 2
    assert [tuple(y.shape) for _, ys in val for y in ys] == sizes
    assert [int(y.max()) for _, ys in val for y in ys] == [i % 3 for i in range(6)]
