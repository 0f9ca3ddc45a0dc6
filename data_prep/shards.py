"""A described dataset (CamVid by default) -> Arrow IPC shards + manifest.json, written in parallel with
Ray Data.

Format: Arrow IPC files, one record batch per sample, so a reader fetches any sample by index from a
memory-mapped file without copying; uncompressed by default (lz4 or zstd on request), the fastest to read
of what was measured (docs/benchmarks.md, "Shard format"; the choice: docs/data.md).
"""

import datetime as dt
import hashlib
import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from data_prep import datasets, storage
from data_prep.camvid import SPLITS, Pair
from data_prep.datasets import CAMVID, DatasetDescription
from data_prep.preview import PREVIEW, write_preview
from segnet.errors import SegNetError
from segnet.losses import class_weights

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("image", pa.binary()),  # raw uint8 pixels, height x width x 3
        ("label", pa.binary()),  # raw uint8 class indices, height x width
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image_sha256", pa.string()),
        ("label_sha256", pa.string()),
    ]
)
COMPRESSIONS = ("none", "lz4", "zstd")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(pairs: dict[str, list[Pair]]) -> str:
    """Cheap identity of the source: every file's path, size and modification time."""
    h = hashlib.sha256()
    for split, split_pairs in pairs.items():
        for p in split_pairs:
            for f in (p.image, p.label):
                st = os.stat(f)
                h.update(f"{split}|{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def write_shard(task: dict) -> dict:
    """Decode, validate and write one shard; runs as a Ray Data task. Bad input comes back as `error`
    (the message names the file) rather than an exception, so the driver can report it in one line.
    Written under a temporary name (beside the target, or in the temp directory for a bucket) and moved
    into place whole."""
    dataset = dataset_of(task)
    class_counts = np.zeros(dataset.num_classes + 1, dtype=np.int64)  # the classes and void, void last
    image_counts = np.zeros(dataset.num_classes + 1, dtype=np.int64)
    batches = []
    try:
        for pair in task["pairs"]:
            s = datasets.load_pair(dataset, Pair(**pair))
            h, w = s["label"].shape
            bins = np.bincount(s["label"].reshape(-1), minlength=dataset.num_classes + 1)
            class_counts += bins
            image_counts += (bins > 0) * (h * w)
            batches.append(
                pa.record_batch(
                    [
                        [s["name"]],
                        [s["image"].tobytes()],
                        [s["label"].tobytes()],
                        [h],
                        [w],
                        [s["image_sha256"]],
                        [s["label_sha256"]],
                    ],
                    schema=SCHEMA,
                )
            )
    except SegNetError as e:
        return {"file": task["file"], "error": str(e)}
    folder = tempfile.gettempdir() if storage.is_uri(task["out"]) else task["out"]
    tmp = Path(folder) / f".{task['file']}.tmp-{uuid.uuid4().hex[:8]}"
    target = storage.join(task["out"], task["file"])
    compression = None if task["compression"] == "none" else task["compression"]
    options = ipc.IpcWriteOptions(compression=compression)
    try:
        with ipc.new_file(str(tmp), SCHEMA, options=options) as writer:
            for b in batches:
                writer.write_batch(b)
        digest = sha256_file(tmp)
        storage.put_file(tmp, target)
    except (OSError, SegNetError) as e:  # a full disk: the partial file goes, nothing is promoted
        tmp.unlink(missing_ok=True)
        error = e if isinstance(e, SegNetError) else storage.failed(target, e)
        return {"file": task["file"], "error": str(error)}
    return {
        "split": task["split"],
        "index": task["index"],
        "file": task["file"],
        "rows": len(batches),
        "sha256": digest,
        "class_pixel_counts": class_counts.tolist(),
        "image_pixel_counts": image_counts.tolist(),
        "error": "",
    }


def read_manifest(shard_dir: str | Path) -> dict:
    return read_manifest_and_id(shard_dir)[0]


def manifest_id(shard_dir: str | Path) -> str:
    """The data identity recorded with runs and models: the manifest file's sha256."""
    return read_manifest_and_id(shard_dir)[1]


def read_manifest_and_id(shard_dir: str | Path) -> tuple[dict, str]:
    """The manifest and its identity (the file's sha256) from one read: a command reads it once and hands
    it to the readers (`ShardReader`, `verify_shards`, the datasets and loaders built on them)."""
    path = storage.join(shard_dir, MANIFEST)
    if not storage.exists(path):
        raise SegNetError(f"{shard_dir} holds no {MANIFEST}: run `segnet prepare` first")
    data = storage.read_bytes(path)
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise SegNetError(f"{path} is not valid JSON ({e})") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise SegNetError(
            f"{path} has schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}"
        )
    return manifest, hashlib.sha256(data).hexdigest()


def dataset_of(manifest: dict, source: str = MANIFEST) -> DatasetDescription:
    """The dataset a manifest (or a shard task, a checkpoint's or a registered model's meta.json) describes;
    one from before descriptions is CamVid."""
    if "dataset" not in manifest:
        return CAMVID
    return DatasetDescription.from_dict(manifest["dataset"], source=f"the `dataset` of {source}")


def verify_shards(shard_dir: str | Path, manifest: dict, split: str | None = None) -> list[str]:
    """Refuse shards that are missing or whose checksum no longer matches the manifest; returns local files
    to memory-map (through the node-local cache of verified shards, so each is hashed once per node)."""
    files = []
    for name in [split] if split else list(manifest["splits"]):
        if name not in manifest["splits"]:
            raise SegNetError(f"{shard_dir}/{MANIFEST} has no split {name!r}")
        for shard in manifest["splits"][name]["shards"]:
            files.append(storage.verified_shard(storage.join(shard_dir, shard["file"]), shard["sha256"]))
    return files


def _valid_existing(
    out: Path, fingerprint: str, limit: int | None, compression: str, dataset: DatasetDescription = CAMVID
) -> bool:
    try:
        manifest = read_manifest(out)
        if manifest.get("source_fingerprint") != fingerprint or manifest.get("limit") != limit:
            return False
        if manifest.get("compression") != compression or dataset_of(manifest) != dataset:
            return False
        verify_shards(out, manifest)
    except SegNetError:
        return False
    return True


# Ray starts at most one worker process per CPU at a time and warns on the console once 4x that many
# exist. A search runs, by design, a trial, a Train controller, its workers and Ray Data's actors, which
# passes 8 on a 2-CPU machine: allow 3 starts per CPU (SkyPilot's setting), so the warning fires at
# 12 processes per CPU, where it points at a real leak.
STARTUP_CONFIG = {"worker_maximum_startup_concurrency": 3 * (os.cpu_count() or 1)}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address` or RAY_ADDRESS), else start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own per-shard lines show progress
    # Ray's own log lines (driver and workers) stay in its session's log files unless `segnet -v`.
    level = "INFO" if os.environ.get("SEGNET_VERBOSE") == "1" else "ERROR"
    options = {"logging_config": ray.LoggingConfig(log_level=level)}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster's workers get the command's settings (SEGNET_*), and its address: Ray Train's
        # placement-group cleaner (an actor) reads the state API's address from RAY_ADDRESS, else it looks
        # for the one Ray on its machine and prints a traceback when there are several.
        settings = {k: v for k, v in os.environ.items() if k.startswith("SEGNET_")}
        where = {} if address == "auto" else {"RAY_ADDRESS": address}
        context = ray.init(address=address, runtime_env={"env_vars": {**settings, **where}}, **options)
    else:
        # One machine has no node that a cloud can reclaim: Ray Train's preemption watcher (an actor per run,
        # whose start Ray core reports with an error line) has nothing to watch.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls; loopback only.
        # The cleaner (an actor) is told where, or it looks for the one Ray on this machine and fails with a
        # traceback on the console when there are several.
        port = free_port()
        api = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
        context = ray.init(
            address="local",  # a Ray of its own, not the `ray start` cluster Ray would find on this machine
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env=api,
            _system_config=STARTUP_CONFIG,
            **options,
        )
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(
    source: str | Path,
    out: str | Path,
    shard_size: int = 32,
    limit: int | None = None,
    workers: int | None = None,
    force: bool = False,
    address: str | None = None,
    compression: str = "none",
    log=print,
    dataset: DatasetDescription | str | None = None,
) -> dict:
    """Build shards and manifest for every split of `dataset` (a description or its YAML file; None:
    CamVid); a no-op when the source is unchanged. A described dataset also gets its preview.png."""
    if compression not in COMPRESSIONS:
        raise SegNetError(f"unknown compression {compression!r}; choose one of: {', '.join(COMPRESSIONS)}")
    if shard_size < 1:
        raise SegNetError(f"--shard-size must be at least 1, got {shard_size}")
    source, out = Path(source).resolve(), storage.absolute(out)
    described = dataset is not None
    dataset = datasets.read_description(dataset) if isinstance(dataset, str) else dataset or CAMVID
    pairs = datasets.find_pairs(dataset, source, limit)
    fingerprint = source_fingerprint(pairs)
    if not force and _valid_existing(out, fingerprint, limit, compression, dataset):
        log(f"{out}/{MANIFEST} is up to date with {source}: nothing to do (use --force to rebuild)")
        return read_manifest(out)
    if storage.exists(storage.join(out, MANIFEST)):  # from here on, no manifest until every shard is good
        storage.delete(storage.join(out, MANIFEST))
    if not storage.is_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)

    tasks = shard_tasks(pairs, out, shard_size, compression, dataset)
    init_ray(address, workers)
    results = write_all_shards(tasks, out, workers, log)
    manifest = build_manifest(source, fingerprint, limit, compression, results, dataset)
    storage.write_bytes(storage.join(out, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    keep = {MANIFEST} | {r["file"] for r in results}
    for stale in storage.list_names(out):  # shards of an earlier build, leftovers of interrupted ones
        if stale not in keep and (stale.endswith(".arrow") or ".tmp-" in stale or stale == PREVIEW):
            storage.delete(storage.join(out, stale))
    counts = ", ".join(f"{s} {split['num_images']}" for s, split in manifest["splits"].items())
    log(f"wrote {len(results)} shards and {out}/{MANIFEST}: {counts}")
    if described:  # a dataset of one's own: a look at its masks and classes before training
        log(f"wrote {write_preview(out, dataset, pairs, manifest)}: overlaid samples and class shares")
    return manifest


def shard_tasks(
    pairs: dict[str, list[Pair]], out: str, shard_size: int, compression: str, dataset: DatasetDescription
) -> list[dict]:
    """One `write_shard` task per `shard_size` pairs of a split, named `SPLIT-INDEX-of-COUNT.arrow`."""
    tasks = []
    for split in pairs:
        chunks = [pairs[split][i : i + shard_size] for i in range(0, len(pairs[split]), shard_size)]
        for i, chunk in enumerate(chunks):
            tasks.append(
                {
                    "split": split,
                    "index": i,
                    "file": f"{split}-{i:05d}-of-{len(chunks):05d}.arrow",
                    "out": out,
                    "compression": compression,
                    "dataset": dataset.to_dict(),
                    "pairs": [vars(p) for p in chunk],
                }
            )
    return tasks


def write_all_shards(tasks: list[dict], out: str, workers: int | None, log) -> list[dict]:
    """Every task's shard, written by Ray Data tasks in parallel; on any failure the shards written by
    this run are deleted (no partial output, and a full disk is freed) and the first error is raised."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    results = []
    for row in ds.map(write_shard, compute=ray.data.TaskPoolStrategy(size=workers)).iter_rows():
        results.append(row)
        log(f"  shard {len(results)}/{len(tasks)}: {row['file']}" + (" FAILED" if row["error"] else ""))
    if len(results) < len(tasks):  # Ray Data can end the iteration quietly when interrupted
        done = f"{len(results)} of {len(tasks)}"
        raise SegNetError(f"interrupted: {done} shards written, so no manifest; run prepare again")
    errors = sorted(r["error"] for r in results if r["error"])
    if errors:
        for r in results:
            if not r["error"]:
                storage.delete(storage.join(out, r["file"]))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SegNetError(errors[0] + more)
    return results


def build_manifest(
    source: Path,
    fingerprint: str,
    limit: int | None,
    compression: str,
    results: list[dict],
    dataset: DatasetDescription = CAMVID,
) -> dict:
    splits = {}
    for split in [s for s in SPLITS if any(r["split"] == s for r in results)]:  # test is optional
        rows = sorted((r for r in results if r["split"] == split), key=lambda r: r["index"])
        splits[split] = {
            "num_images": sum(r["rows"] for r in rows),
            "shards": [{"file": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in rows],
            "class_pixel_counts": np.sum([r["class_pixel_counts"] for r in rows], axis=0).tolist(),
            "image_pixel_counts": np.sum([r["image_pixel_counts"] for r in rows], axis=0).tolist(),
        }
    train = splits["train"]
    k = dataset.num_classes
    weights = {
        mode: class_weights(train["class_pixel_counts"][:k], train["image_pixel_counts"][:k], mode).tolist()
        for mode in ("median_frequency", "inverse_frequency")
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "arrow-ipc, one record batch per sample",
        "compression": compression,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "source_fingerprint": fingerprint,
        "limit": limit,
        "classes": list(dataset.classes),
        "void": dataset.void_index,
        "dataset": dataset.to_dict(),
        "splits": splits,
        "class_weights": weights,
    }


class ShardReader:
    """Random access to one split's samples, by index, from memory-mapped shards (checksums verified).

    `verify=False` reads local shards unchecked (the driver checked them on this machine); shards in a
    bucket always come through the node-local cache of verified copies. `manifest`: the shards' manifest,
    if the caller has read it already."""

    def __init__(self, shard_dir: str | Path, split: str, verify: bool = True, manifest: dict | None = None):
        self.manifest = manifest or read_manifest(shard_dir)
        if split not in self.manifest["splits"]:
            raise SegNetError(f"{shard_dir}/{MANIFEST} has no split {split!r}")
        shards = self.manifest["splits"][split]["shards"]
        self.remote = storage.is_uri(shard_dir)
        self.locations = [(storage.join(shard_dir, s["file"]), s["sha256"]) for s in shards]
        if verify or self.remote:
            self.files = verify_shards(shard_dir, self.manifest, split)
        else:
            self.files = [str(Path(shard_dir) / s["file"]) for s in shards]
        self.index = [(f, i) for f, s in enumerate(shards) for i in range(s["rows"])]
        self._readers: dict[int, ipc.RecordBatchFileReader] = {}
        self._held: dict = {}  # the node-cache copies this reader maps, locked against eviction

    def _open(self, f: int) -> ipc.RecordBatchFileReader:
        if self.remote:
            try:
                self._held[f] = storage.hold_shard(self.files[f])
            except FileNotFoundError:  # evicted from the node cache since it was checked: fetched again
                self.files[f] = storage.verified_shard(*self.locations[f])
                self._held[f] = storage.hold_shard(self.files[f])
        return ipc.open_file(pa.memory_map(self.files[f]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        f, row = self.index[i]
        if f not in self._readers:  # opened lazily, so each DataLoader worker maps its own files
            self._readers[f] = self._open(f)
        b = self._readers[f].get_batch(row)
        h, w = b.column("height")[0].as_py(), b.column("width")[0].as_py()
        return {
            "name": b.column("name")[0].as_py(),
            "image": np.frombuffer(b.column("image")[0].as_buffer(), np.uint8).reshape(h, w, 3),
            "label": np.frombuffer(b.column("label")[0].as_buffer(), np.uint8).reshape(h, w),
        }

    def __getstate__(self):  # memory maps do not pickle; workers reopen them
        return {**self.__dict__, "_readers": {}, "_held": {}}


def iter_samples(shard_dir: str | Path, split: str, manifest: dict | None = None) -> Iterator[dict]:
    """Every sample of a split in manifest order: `image` (uint8 HxWx3), `label` (uint8 HxW), `name`."""
    reader = ShardReader(shard_dir, split, manifest=manifest)
    for i in range(len(reader)):
        yield reader[i]


def ray_dataset(shard_dir: str | Path, split: str, manifest: dict | None = None):
    """A Ray Data dataset of a split's rows, for training with `iter_torch_batches`; checksums verified."""
    import ray

    tables = []
    for file in verify_shards(shard_dir, manifest or read_manifest(shard_dir), split):
        with pa.memory_map(file) as src:
            tables.append(ipc.open_file(src).read_all())
    return ray.data.from_arrow(tables)
