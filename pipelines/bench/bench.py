"""`segnet bench`: measured figures, printed (and as JSON), never asserted by tests.

The step benches import nothing beyond torch and the project's models, so the GPU check can run them on
a machine without albumentations or Ray.
"""

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.datasets import CAMVID  # the step bench measures the paper's CamVid models
from pipelines.core.measure import (
    merge_rates,
    mfu_figures,
    peak_rates,
    read_cpu,
    run_isolated,
    theoretical_peak,
)
from segnet.errors import SegNetError


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
    from data_prep.shards import ShardReader, dataset_of, read_manifest

    reader = ShardReader(shard_dir, split)
    n = min(n, len(reader))
    pairs = find_pairs(source)[split][:n]
    transform = train_transform(AugmentConfig(*size), seed=0, void=dataset_of(reader.manifest).void_index)

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

    def __init__(self, size, void: int):
        from data_prep.augment import AugmentConfig, train_transform

        self.transform = train_transform(AugmentConfig(*size), seed=0, void=void)

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
    from data_prep.shards import dataset_of, init_ray, ray_dataset, read_manifest

    void = dataset_of(read_manifest(shard_dir)).void_index
    transform = train_transform(AugmentConfig(*size), seed=0, void=void)
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
            fn_constructor_args=(size, void),
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

    import torch

    from data_prep.augment import AugmentConfig as Aug
    from data_prep.augment import ShardDataset, make_loader, train_transform
    from data_prep.shards import dataset_of
    from data_prep.shards import read_manifest as manifest_of
    from pipelines.core.engine import train_epoch
    from segnet import build_model, segmentation_loss

    manifest = manifest_of(shard_dir)
    torch.manual_seed(seed)
    torch.set_num_threads(cpus)
    dataset = dataset_of(manifest)
    net = build_model(model, dataset.num_classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = segmentation_loss(
        manifest["class_weights"]["median_frequency"], ignore_index=dataset.void_index
    )
    loader = make_loader(
        ShardDataset(shard_dir, "train", train_transform(Aug(*size), seed=seed, void=dataset.void_index)),
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
    figures.update(ray_train_figures(shard_dir, model, size, batch_size, epochs, cpus, seed))
    figures["ray_1_worker_vs_plain"] = (
        figures["ray_train_1_worker_images_per_s"] / figures["plain_images_per_s"]
    )
    return figures


def ray_train_figures(shard_dir: str, model: str, size, batch_size: int, epochs: int, cpus: int, seed: int):
    """Ray Train's side of bench_train: 1 worker with all `cpus` threads, then 2 with half each; the
    fastest epoch of each (all workers' images), with its data-wait fraction."""
    import tempfile

    from pipelines.config import TrainConfig
    from pipelines.train.driver import train

    figures = {}
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
    compile: str = "auto",
    compile_mode: str = "default",
) -> dict:
    """Step time, images/s, FLOPs, achieved FLOP/s, MFU against this machine's best measured rate in the
    step's precision (matmul and 3x3 convolution, each the best of several bursts before and after the step,
    spread reported; on a CPU the theoretical peak beside it), the load average, and peak memory (CPU:
    resident-set growth of the step); with `baseline`, the plain reference in the same run. `compile` is
    train's auto | on | off; `compile_mode` is torch.compile's mode when it compiles."""
    import torch

    from pipelines.core.engine import use_compile

    threads = threads or torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile = compile_mode if use_compile(compile, torch.device(device)) else None
    dtype = torch.bfloat16 if amp else torch.float32
    spec = {"device": device, "model": model, "size": tuple(size), "batch": batch, "mode": mode}
    spec.update(steps=steps, threads=threads, amp=amp, num_classes=CAMVID.num_classes)  # the paper's setting
    load_before, before = os.getloadavg(), peak_rates(dtype, device)
    ours_spec = {**spec, "reference": False, "channels_last": channels_last}
    ours = run_isolated({**ours_spec, "recompute": recompute, "compile": compile})
    rates, load_after = merge_rates(before, peak_rates(dtype, device)), os.getloadavg()
    achieved = ours["flops_per_image"] * batch / ours["seconds_per_step"]
    theoretical = theoretical_peak(read_cpu(), threads, amp) if device == "cpu" else None
    matmul = next(r for name, r in rates.items() if "matmul" in name or "torch.mm" in name)
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
        "matmul_flops_per_s": matmul["best"],
        "matmul_spread": matmul["spread"],
        **mfu_figures(achieved, rates, theoretical),
        "load_average_1min": [load_before[0], load_after[0]],
    }
    if baseline:
        figures.update(baseline_figures(spec, figures))
    return figures


def baseline_figures(spec: dict, ours: dict) -> dict:
    """The plain reference's step (NCHW, fp32 unless `amp`) in a fresh process, against ours."""
    ref = run_isolated({**spec, "reference": True, "channels_last": False})
    images_per_s = spec["batch"] / ref["seconds_per_step"]
    return {
        "baseline_images_per_s": images_per_s,
        "baseline_peak_memory_bytes": ref["peak_memory_bytes"],
        "speed_vs_baseline": ours["images_per_s"] / images_per_s,
        "memory_vs_baseline": ours["peak_memory_bytes"] / max(ref["peak_memory_bytes"], 1),
        "load_average_1min_after_baseline": os.getloadavg()[0],
    }


def bench_serve(
    url: str | None,
    image: str | Path | None = None,
    clients: int = 8,
    requests_per_client: int = 25,
    plot: str | Path | None = None,
    served=None,
    duration: float = 0,
    rate: float = 2.0,
) -> dict:
    """N concurrent clients, each posting the image `requests_per_client` times to a running `segnet serve`
    over HTTP: requests/s, latency percentiles, errors (any answer but 200), and a latency plot. With a
    `duration`, a soak instead (`bench_soak`). Without a `url`, serves the model of `served` (a
    ServeConfig) here for the bench's length."""
    if url is None:
        from pipelines.serve import serving

        with serving(served) as url:
            if duration:
                return bench_soak(url, duration, rate, clients, plot, image, rss_root=os.getpid())
            return bench_clients(url, image, clients, requests_per_client, plot)
    if duration:
        return bench_soak(url, duration, rate, clients, plot, image)
    return bench_clients(url, image, clients, requests_per_client, plot)


def bench_clients(url: str, image, clients: int, requests_per_client: int, plot) -> dict:
    """`bench serve` without a duration: closed-loop clients, each sending its next request on an answer."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from pipelines.core.plots import save_latency_plot

    image = image or first_test_image()
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


def first_test_image() -> Path:
    from pipelines.config import camvid_dir

    found = sorted((Path(camvid_dir()) / "test").glob("*.png"))[:1]
    if not found:
        raise SegNetError(f"no image given and no CamVid test images in {camvid_dir()}/test")
    return found[0]


SOAK_SIZES = ((180, 240), (360, 480), (720, 960))  # CamVid's own size, half and double


def soak_payloads(image: str | Path | None = None, count: int = 3) -> list[tuple[bytes, str]]:
    """The soak's requests: `image` (default: the first `count` CamVid test images) at each of
    SOAK_SIZES, as PNG and as JPEG."""
    import io

    paths = [Path(image)] if image else sorted(first_test_image().parent.glob("*.png"))[:count]
    payloads = []
    for path in paths:
        picture = Image.open(path).convert("RGB")
        for h, w in SOAK_SIZES:
            for fmt in ("PNG", "JPEG"):
                out = io.BytesIO()
                picture.resize((w, h), Image.BILINEAR).save(out, format=fmt)
                payloads.append((out.getvalue(), f"image/{fmt.lower()}"))
    return payloads


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the raylet, workers and actors of a local Ray it started)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return found


def replica_rss(root: int | None = None) -> int:
    """Bytes resident in the Serve replica processes (titled ray::ServeReplica) below `root`, or on this
    machine when `root` is None."""
    pids = descendants(root) if root else [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    total = 0
    for p in pids:
        try:
            if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::ServeReplica"):
                total += int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError):
            continue
    return total


def open_loop(url: str, payloads: list, rate: float, duration: float, workers: int) -> list[tuple]:
    """Request i is handed to a pool of `workers` threads at i / rate s, whatever the latency of the others
    (open loop); (scheduled s, latency s counted from the schedule, so that waiting for a free thread
    counts, status: the HTTP code or the exception's name)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    local, t0 = threading.local(), time.perf_counter()

    def send(i: int, scheduled: float) -> tuple:
        data, ctype = payloads[i % len(payloads)]
        local.session = getattr(local, "session", None) or requests.Session()
        try:
            r = local.session.post(f"{url}/predict", data=data, headers={"Content-Type": ctype}, timeout=60)
            status = r.status_code
        except requests.RequestException as e:
            status = type(e).__name__
        return scheduled - t0, time.perf_counter() - scheduled, status

    with ThreadPoolExecutor(workers) as pool:
        futures = []
        for i in range(int(duration * rate)):
            scheduled = t0 + i / rate
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            futures.append(pool.submit(send, i, scheduled))
        return [f.result() for f in futures]


def memory_figures(samples: list[tuple[float, int]], warmup_s: float) -> dict:
    """The replica's RSS over the soak: its least-squares slope after `warmup_s` (MB per minute), and
    whether it is flat: the median of the last `warmup_s` within 5% of the median of the `warmup_s` after the
    warm-up. Medians of windows, not single samples: a request in flight moves the RSS by its own size."""
    t = np.array([s for s, _ in samples], dtype=float)
    mb = np.array([b for _, b in samples], dtype=float) / 2**20
    after = t >= min(warmup_s, t[-1])
    slope, intercept = np.polyfit(t[after] / 60, mb[after], 1) if after.sum() > 1 else (0.0, mb[-1])
    start = float(np.median(mb[after & (t < warmup_s * 2)] if (after & (t < warmup_s * 2)).any() else mb))
    end = float(np.median(mb[t >= t[-1] - warmup_s]))
    return {
        "rss_warmup_s": warmup_s,
        "rss_after_warmup_mb": round(start, 1),
        "rss_end_mb": round(end, 1),
        "rss_change_pct": round(100 * (end - start) / start, 2) if start else None,
        "rss_slope_mb_per_min": round(float(slope), 3),
        "rss_intercept_mb": float(intercept),
        "memory_flat": bool(start and abs(end - start) <= 0.05 * start),
    }


def soak_figures(results: list[tuple], wall_s: float) -> dict:
    """requests/s answered 200, p50/p95/p99 of those (ms, counted from the schedule), errors by status."""
    ok = np.array([1000 * latency for _, latency, status in results if status == 200] or [np.nan])
    errors: dict[str, int] = {}
    for _, _, status in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    return {
        "requests": len(results),
        "requests_per_s": round((len(results) - sum(errors.values())) / wall_s, 3),
        "p50_ms": round(float(np.percentile(ok, 50)), 1),
        "p95_ms": round(float(np.percentile(ok, 95)), 1),
        "p99_ms": round(float(np.percentile(ok, 99)), 1),
        "errors": errors,
    }


def bench_soak(url, duration: float, rate: float, workers: int, plot=None, image=None, rss_root=None) -> dict:
    """A soak: mixed sizes and formats (`soak_payloads`) at `rate` requests/s, open loop, for `duration` s;
    throughput, latency, errors, and the replicas' RSS sampled from /proc over the run (the first minute,
    or a quarter of a shorter run, is warm-up), with a figure."""
    import threading

    import requests

    from pipelines.core.plots import save_soak_plot

    payloads = soak_payloads(image)
    for data, ctype in payloads:  # warm-up: every shape once
        requests.post(f"{url}/predict", data=data, headers={"Content-Type": ctype}, timeout=120)
    samples, done, load_before, t0 = [], threading.Event(), os.getloadavg(), time.perf_counter()

    def sample():
        while True:
            samples.append((time.perf_counter() - t0, replica_rss(rss_root)))
            if done.wait(min(1.0, duration / 20)):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = open_loop(url, payloads, rate, duration, workers)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    figures = {"duration_s": duration, "rate": rate, "workers": workers, "payloads": len(payloads)}
    figures.update(soak_figures(results, wall))
    figures.update(memory_figures(samples, min(60.0, duration / 4)))
    figures["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
    figures["rss_mb"] = [[round(t, 1), round(b / 2**20, 1)] for t, b in samples]
    if plot:
        title = f"segnet serve soak: {rate} req/s offered, {figures['requests_per_s']} answered 200"
        figures["plot"] = str(save_soak_plot(results, samples, figures, title, Path(plot)))
    return figures
