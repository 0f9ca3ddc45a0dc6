"""SegNet models, losses and metrics (Badrinarayanan, Kendall, Cipolla, TPAMI 2017). No Ray, no MLflow."""

from segnet.errors import SegNetError
from segnet.losses import class_weights, segmentation_loss
from segnet.models import MODELS, build_model, count_parameters, list_models

CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
NUM_CLASSES = len(CLASSES)
VOID = 11  # "Unlabelled" in the SegNet CamVid labels, ignored by loss and metrics

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
