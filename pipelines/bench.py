"""`segnet bench`: measured figures, printed (and as JSON), never asserted by tests.

The step benches import nothing beyond torch and the project's models, so the GPU check can run them on
a machine without albumentations or Ray.
"""

import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.measure import matmul_rate, mfu_figures, run_isolated


def _rate(fn, n: int) -> float:
    """Samples per second of fn(i) over i in range(n), after one warm-up call."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def bench_data(
    shard_dir: str | Path,
    source: str | Path,
    split: str = "train",
    n: int = 64,
    size=(360, 480),
    loaders=False,
):
    """Samples/s of the three input paths, one after the other in this process, on the same samples."""
    from data_prep.augment import AugmentConfig, to_tensors, train_transform
    from data_prep.camvid import find_pairs
    from data_prep.shards import ShardReader, read_manifest

    reader = ShardReader(shard_dir, split)
    n = min(n, len(reader))
    pairs = find_pairs(source)[split][:n]
    transform = train_transform(AugmentConfig(*size), seed=0)

    def png(i):
        p = pairs[i % n]
        return np.asarray(Image.open(p.image).convert("RGB")), np.asarray(Image.open(p.label))

    def png_aug(i):
        image, label = png(i)
        out = transform(image=image, mask=label)
        return to_tensors(out["image"], out["mask"])

    def shard(i):
        s = reader[i % n]
        return s["image"], s["label"]

    def shard_aug(i):
        s = reader[i % n]
        out = transform(image=s["image"], mask=s["label"])
        return to_tensors(out["image"], out["mask"])

    figures = {
        "split": split,
        "samples": n,
        "augment_size": f"{size[0]}x{size[1]}",
        "png_decode_per_s": _rate(png, n),
        "shard_read_per_s": _rate(shard, n),
        "png_decode_augment_per_s": _rate(png_aug, n),
        "shard_read_augment_per_s": _rate(shard_aug, n),
        "manifest_images": read_manifest(shard_dir)["splits"][split]["num_images"],
    }
    figures["shard_vs_png_with_augment"] = (
        figures["shard_read_augment_per_s"] / figures["png_decode_augment_per_s"]
    )
    if loaders:
        figures.update(bench_loaders(shard_dir, split, size))
    return figures


class AugmentBatch:
    """Ray Data's side of the comparison: a callable class, so each actor of the pool builds its transform
    once, as each DataLoader worker does."""

    def __init__(self, size):
        from data_prep.augment import AugmentConfig, train_transform

        self.transform = train_transform(AugmentConfig(*size), seed=0)

    def __call__(self, batch: dict) -> dict:
        images, labels = [], []
        for im, lb, h, w in zip(batch["image"], batch["label"], batch["height"], batch["width"]):
            image = np.frombuffer(im, np.uint8).reshape(h, w, 3)
            out = self.transform(image=image, mask=np.frombuffer(lb, np.uint8).reshape(h, w))
            images.append(out["image"].transpose(2, 0, 1))
            labels.append(out["mask"])
        return {"image": np.stack(images), "label": np.stack(labels).astype(np.int64)}


def bench_loaders(shard_dir, split: str, size, batch_size: int = 12, workers: int = 2) -> dict:
    """Augmented training samples/s over a whole split, on equal terms: `workers` DataLoader processes
    against a Ray Data pool of `workers` actors; both shuffle, both prefetch, and each is timed on its
    second pass (the first warms processes and caches). Ray Data's own stats come with the figure."""
    import ray

    from data_prep.augment import AugmentConfig, ShardDataset, make_loader, train_transform
    from data_prep.shards import init_ray, ray_dataset

    transform = train_transform(AugmentConfig(*size), seed=0)
    loader = make_loader(
        ShardDataset(shard_dir, split, transform), batch_size, shuffle=True, num_workers=workers
    )

    def loader_pass() -> int:
        return sum(len(x) for x, _ in loader)

    loader_pass()
    t0 = time.perf_counter()
    figures = {"dataloader_per_s": loader_pass() / (time.perf_counter() - t0)}

    init_ray(num_cpus=workers)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = (
        ray_dataset(shard_dir, split)
        .randomize_block_order()
        .map_batches(
            AugmentBatch,
            fn_constructor_args=(size,),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
        )
    )

    def ray_pass() -> int:
        batches = ds.iter_torch_batches(
            batch_size=batch_size, prefetch_batches=2, local_shuffle_buffer_size=4 * batch_size
        )
        return sum(len(b["image"]) for b in batches)

    ray_pass()
    t0 = time.perf_counter()
    figures["ray_data_per_s"] = ray_pass() / (time.perf_counter() - t0)
    figures["ray_data_stats"] = ds.stats()
    return figures


def bench_storage(shard_dir: str, split: str = "train") -> dict:
    """Samples/s of a split's shards in a bucket (any URI): streamed (one ranged read per sample, as a
    shuffling reader would) against copied once into a node-local cache, verified and memory-mapped (the
    first pass pays the copy and the sha256; later passes, and every other trial on the node, read the
    local copy)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.ipc as ipc

    from data_prep import storage
    from data_prep.shards import read_manifest

    shards = read_manifest(shard_dir)["splits"][split]["shards"]
    n = sum(s["rows"] for s in shards)
    fs, root = storage.resolve(shard_dir)

    def read_all(open_file) -> float:
        t0 = time.perf_counter()
        for s in shards:
            reader = ipc.open_file(open_file(s))
            for i in range(reader.num_record_batches):
                reader.get_batch(i).column("image")[0].as_buffer()
        return n / (time.perf_counter() - t0)

    figures = {
        "split": split,
        "samples": n,
        "streamed_per_s": read_all(lambda s: fs.open_input_file(f"{root}/{s['file']}")),
    }
    with tempfile.TemporaryDirectory() as cache:

        def cached(s):
            return pa.memory_map(
                storage.verified_shard(storage.join(shard_dir, s["file"]), s["sha256"], Path(cache))
            )

        figures["cached_first_pass_per_s"] = read_all(cached)
        figures["cached_later_pass_per_s"] = read_all(cached)
    return figures


def bench_train(
    shard_dir: str, model: str, size, batch_size: int, epochs: int, cpus: int, seed: int = 0
) -> dict:
    """Training images/s on the same data and model: a plain PyTorch loop, then Ray Train with 1 worker
    (all `cpus` threads) and 2 workers (half each), each with the fraction of the epoch spent waiting for
    data. Figures exclude the first step and evaluation."""
    import tempfile

    import torch

    from data_prep.augment import AugmentConfig as Aug
    from data_prep.augment import ShardDataset, make_loader, train_transform
    from data_prep.shards import read_manifest as manifest_of
    from pipelines.config import TrainConfig
    from pipelines.engine import train_epoch
    from pipelines.train import train
    from segnet import build_model, segmentation_loss

    manifest = manifest_of(shard_dir)
    torch.manual_seed(seed)
    torch.set_num_threads(cpus)
    net = build_model(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = segmentation_loss(manifest["class_weights"]["median_frequency"])
    loader = make_loader(
        ShardDataset(shard_dir, "train", train_transform(Aug(*size), seed=seed)),
        batch_size,
        True,
        seed,
        1,
        drop_last=True,
    )
    device = torch.device("cpu")
    plain = max(
        (train_epoch(net, loader, loss_fn, optimizer, device) for _ in range(epochs)),
        key=lambda stats: stats["train_images_per_s"],
    )
    figures = {
        "model": model,
        "image_size": f"{size[0]}x{size[1]}",
        "batch_size": batch_size,
        "plain_images_per_s": plain["train_images_per_s"],
        "plain_data_wait_fraction": plain["data_wait_fraction"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            cfg = TrainConfig(
                data=str(shard_dir),
                model=model,
                workers=workers,
                cpus_per_worker=cpus // workers,
                epochs=epochs,
                batch_size=batch_size,
                image_size=f"{size[0]}x{size[1]}",
                seed=seed,
                storage_path=f"{tmp}/runs",
                mlflow_uri=f"sqlite:///{tmp}/bench.db",
                name=f"bench-{workers}",
                keep_checkpoints=1,
            )
            best = train(cfg)
            history = best["history"]
            fastest = max(history, key=lambda h: h["train_images_per_s"])
            figures[f"ray_train_{workers}_worker_images_per_s"] = fastest["train_images_per_s"] * workers
            figures[f"ray_train_{workers}_worker_data_wait_fraction"] = fastest["data_wait_fraction"]
    figures["ray_1_worker_vs_plain"] = (
        figures["ray_train_1_worker_images_per_s"] / figures["plain_images_per_s"]
    )
    return figures


def bench_model(
    model: str,
    size,
    batch: int,
    mode: str = "train",
    steps: int = 3,
    baseline: bool = False,
    channels_last: bool = True,
    threads: int | None = None,
    recompute: int = 0,
    amp: bool = False,
    compile: str | None = None,
) -> dict:
    """Step time, images/s, FLOPs, achieved FLOP/s, MFU against this machine's matmul rate (best of
    several bursts before and after the step, spread reported), and peak memory (CPU: resident-set
    growth of the step); with `baseline`, the plain reference in the same run."""
    import torch

    threads = threads or torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if amp else torch.float32
    spec = {
        "device": device,
        "model": model,
        "size": tuple(size),
        "batch": batch,
        "mode": mode,
        "steps": steps,
        "threads": threads,
        "amp": amp,
    }
    before = matmul_rate(dtype, device)
    ours = run_isolated(
        {
            **spec,
            "reference": False,
            "channels_last": channels_last,
            "recompute": recompute,
            "compile": compile,
        }
    )
    after = matmul_rate(dtype, device)
    rate = {"best": max(before["best"], after["best"]), "worst": min(before["worst"], after["worst"])}
    achieved = ours["flops_per_image"] * batch / ours["seconds_per_step"]
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": model,
        "mode": mode,
        "image_size": f"{size[0]}x{size[1]}",
        "batch_size": batch,
        "threads": threads,
        "channels_last": channels_last,
        "recompute": recompute,
        "compile": compile,
        "precision": "bf16 autocast" if amp else "fp32",
        **ours,
        "images_per_s": batch / ours["seconds_per_step"],
        "achieved_flops_per_s": achieved,
        "matmul_flops_per_s": rate["best"],
        "matmul_spread": rate["worst"] / rate["best"],
        **mfu_figures(achieved, rate),
    }
    if baseline:
        ref = run_isolated({**spec, "reference": True, "channels_last": False})
        figures["baseline_images_per_s"] = batch / ref["seconds_per_step"]
        figures["baseline_peak_memory_bytes"] = ref["peak_memory_bytes"]
        figures["speed_vs_baseline"] = figures["images_per_s"] / figures["baseline_images_per_s"]
        figures["memory_vs_baseline"] = ours["peak_memory_bytes"] / max(ref["peak_memory_bytes"], 1)
    return figures


def bench_serve(
    url: str,
    image: str | Path,
    clients: int = 8,
    requests_per_client: int = 25,
    plot: str | Path | None = None,
) -> dict:
    """N concurrent clients, each posting the image `requests_per_client` times to a running `segnet serve`
    over HTTP: requests/s, latency percentiles, errors (any answer but 200), and a latency plot."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from pipelines.plots import save_latency_plot

    data = Path(image).read_bytes()
    ctype = "image/jpeg" if Path(image).suffix.lower() in (".jpg", ".jpeg") else "image/png"
    requests.post(f"{url}/predict", data=data, headers={"Content-Type": ctype}, timeout=120)  # warm-up
    t0 = time.perf_counter()

    def client(_) -> list[tuple[float, float, bool]]:
        session, out = requests.Session(), []
        for _ in range(requests_per_client):
            start = time.perf_counter()
            try:
                r = session.post(f"{url}/predict", data=data, headers={"Content-Type": ctype}, timeout=120)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            out.append((start - t0, time.perf_counter() - start, ok))
        return out

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [(s, 1000 * t) for s, t, good in results if good]
    latencies = np.array([t for _, t in ok]) if ok else np.array([np.nan])
    figures = {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "requests_per_s": round(len(ok) / wall, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }
    if plot and ok:
        title = f"segnet serve: {clients} clients, {figures['requests_per_s']} req/s"
        figures["plot"] = str(save_latency_plot([t for _, t in ok], [s for s, _ in ok], title, Path(plot)))
    return figures
