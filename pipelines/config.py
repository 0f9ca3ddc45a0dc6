"""Every setting of the training steps, each defined once: the CLI (pipelines/cli.py) is generated from these
classes by jsonargparse, and YAML files in configs/ (`--config FILE`) set any of them. Each class checks its
own values when it is built, so a bad value gets one line naming the key, from a file, a flag or Python.

A search holds a train config (its trials' settings), and Table 1 and `segnet run` hold a search config.
"""

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from segnet.errors import SegNetError
from segnet.losses import WEIGHTING_MODES
from segnet.models import MODELS

CONFIGS = (
    Path(__file__).resolve().parents[1] / "configs"
)  # the profiles: small.yaml, paper.yaml, table1-*.yaml
METRICS = ("val_miou", "val_global_accuracy", "val_class_accuracy", "val_bf")
COMPILE = ("auto", "on", "off")
INPUTS = ("auto", "loader", "device")
SCHEDULERS = ("asha", "fifo")
TABLE1_BALANCING = {
    "median_frequency": "median frequency",
    "none": "natural frequency",
}  # Table 1's two modes


def choose(key: str, value, choices) -> None:
    if value not in choices:
        raise SegNetError(f"{key} {value!r}: choose one of {', '.join(map(str, choices))}")


def at_least(key: str, value, low) -> None:
    if value < low:
        raise SegNetError(f"{key} {value}: must be at least {low}")


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
    """Bayesian SegNet dropout (segnet only)"""
    vgg16_weights: str | None = None
    """local VGG16(-BN) state dict for the encoder (segnet only)"""
    sync_bn: bool = False
    """SyncBatchNorm across GPU workers"""
    amp: bool = False
    """bf16 autocast"""
    channels_last: bool = True
    """NHWC layout: faster convs and pooling on CPU (docs/benchmarks.md)"""
    recompute: int = 0
    """segnet: recompute the blocks of the N largest resolutions in backward (less memory)"""
    compile: str = "auto"
    """torch.compile: auto | on | off (auto: on GPU workers only; pipelines/engine.py says why)"""
    input: str = "auto"
    """augment in DataLoader workers (loader) or on the device (device); auto: device on GPU workers"""
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
    experiment: str = "segnet-camvid"
    """MLflow experiment"""
    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS or a local Ray)"""

    def __post_init__(self):
        choose("model", self.model, MODELS)
        choose("class_weighting", self.class_weighting, WEIGHTING_MODES)
        choose("compile", self.compile, COMPILE)
        choose("input", self.input, INPUTS)
        choose("metric", self.metric, METRICS)
        for key in ("cpus_per_worker", "epochs", "batch_size", "keep_checkpoints"):
            at_least(key, getattr(self, key), 1)
        for key in ("max_failures", "loader_workers", "recompute", "gpus_per_worker", "placement_timeout"):
            at_least(key, getattr(self, key), 0)
        if self.lr <= 0:
            raise SegNetError(f"lr {self.lr}: must be > 0")
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
    register_as: str = "segnet-camvid"
    """registered model name"""
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
    """The paper's Table 1: decoder variants x class balancing, one Tune grid, every trial the paper's
    recipe (SGD, lr 0.1, momentum 0.9, batch 12; checkpoint by validation global accuracy)."""

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
    profile: str = "cpu"
    """the profile's name, shown in the report"""
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
    """`segnet run`: prepare CamVid, search, register the best model, predict one test image."""

    tune: TuneConfig = field(default_factory=lambda: TuneConfig(train=trial_defaults("shards")))
    """the search; its tune.train.data is where the shards go"""
    source: str | None = None
    """CamVid (default: $CAMVID_DIR, ./data/CamVid, or downloaded there)"""
    output: str = "run-output"
    """the prediction's folder"""


def merge(base: dict, values: dict) -> dict:
    for k, v in values.items():
        base[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def build(cls, values: dict):
    """A config object from a nested dict (as jsonargparse parses it, or part of one): keys not given keep
    the class's defaults; keys that are not settings (a command's other options) are left out."""

    def make(cls, values: dict):
        kwargs = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        for f in fields(cls):
            if is_dataclass(f.type) and isinstance(kwargs.get(f.name), dict):
                kwargs[f.name] = make(f.type, kwargs[f.name])
        return cls(**kwargs)

    return make(cls, merge(asdict(cls()), values))


def from_file(cls, path: str | Path, **overrides):
    """A config from a YAML file (a profile in configs/), with nested overrides: the Python side of
    `segnet CMD --config FILE`. Only plain YAML: tags that construct objects are refused."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SegNetError(f"{path}: not a readable YAML config: {' '.join(str(e).split())}") from e
    return build(cls, merge(values, overrides))
