"""SegNet models, losses and metrics (Badrinarayanan, Kendall, Cipolla, TPAMI 2017). No Ray, no MLflow.

The names below load their module on first use (PEP 562), so that `segnet.errors`, `segnet.classes` and
`segnet.losses.class_weights` import without torch: data_prep's Ray Data tasks (shard writing) import them,
and torch costs each such process 1.5 to 3.5 s of CPU."""

from importlib import import_module

from segnet.errors import SegNetError

_LAZY = {
    "MODELS": "segnet.models",
    "SegmentationModel": "segnet.models",
    "build_model": "segnet.models",
    "count_parameters": "segnet.models",
    "list_models": "segnet.models",
    "class_weights": "segnet.losses",
    "segmentation_loss": "segnet.losses",
}
__all__ = ["SegNetError", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'segnet' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
