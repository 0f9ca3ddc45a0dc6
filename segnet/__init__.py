"""SegNet models, losses and metrics (Badrinarayanan, Kendall, Cipolla, TPAMI 2017). No Ray, no MLflow."""

from segnet.classes import CLASSES, NUM_CLASSES, VOID
from segnet.errors import SegNetError
from segnet.losses import class_weights, segmentation_loss
from segnet.models import MODELS, build_model, count_parameters, list_models

__all__ = [
    "CLASSES",
    "MODELS",
    "NUM_CLASSES",
    "VOID",
    "SegNetError",
    "build_model",
    "class_weights",
    "count_parameters",
    "list_models",
    "segmentation_loss",
]
