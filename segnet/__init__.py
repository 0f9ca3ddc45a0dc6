"""SegNet models, losses and metrics (Badrinarayanan, Kendall, Cipolla, TPAMI 2017). No Ray, no MLflow."""

from segnet.errors import SegNetError
from segnet.losses import class_weights, segmentation_loss
from segnet.models import MODELS, SegmentationModel, build_model, count_parameters, list_models

__all__ = [
    "MODELS",
    "SegNetError",
    "SegmentationModel",
    "build_model",
    "class_weights",
    "count_parameters",
    "list_models",
    "segmentation_loss",
]
