"""The paper's figures, in one place for the code and the tests (Badrinarayanan, Kendall, Cipolla,
SegNet, IEEE TPAMI 39(12) 2017). Transcribed from the paper; parameter counts are cross-checked against
our models by tests/segnet/test_models.py."""

PAPER_SOURCE = (
    "Badrinarayanan, Kendall, Cipolla, SegNet, IEEE TPAMI 39(12) 2017, Table 1: CamVid test set, "
    "11 classes, 360x480, inference time on an NVIDIA Titan GPU"
)
# Table 6: SegNet (VGG16 encoder, 11 CamVid classes), parameters in millions.
SEGNET_PARAMS_M = 29.46

# Table 1 as printed: params (M), storage multiplier (None where the paper prints n/a), inference ms, and
# G, C, mIoU, BF (percent) for median-frequency and natural-frequency (no) class balancing.
PAPER_TABLE1 = {
    "bilinear-interpolation": {
        "paper_name": "Bilinear-Interpolation", "params_m": 0.625, "storage": 0, "infer_ms": 24.2,
        "median_frequency": (77.9, 61.1, 43.3, 20.83), "none": (82.7, 52.5, 43.8, 23.08),
    },
    "segnet-basic": {
        "paper_name": "SegNet-Basic", "params_m": 1.425, "storage": 1, "infer_ms": 52.6,
        "median_frequency": (82.7, 62.0, 47.7, 35.78), "none": (84.0, 54.6, 46.3, 36.67),
    },
    "segnet-basic-encoder-addition": {
        "paper_name": "SegNet-Basic-EncoderAddition", "params_m": 1.425, "storage": 64, "infer_ms": 53.0,
        "median_frequency": (83.4, 63.6, 48.5, 35.92), "none": (84.2, 56.5, 47.7, 36.27),
    },
    "segnet-basic-single-channel-decoder": {
        "paper_name": "SegNet-Basic-SingleChannelDecoder", "params_m": 0.625, "storage": 1, "infer_ms": 33.1,
        "median_frequency": (81.2, 60.7, 46.1, 31.62), "none": (83.5, 53.9, 45.2, 32.45),
    },
    "fcn-basic": {
        "paper_name": "FCN-Basic", "params_m": 0.65, "storage": 11, "infer_ms": 24.2,
        "median_frequency": (81.7, 62.4, 47.3, 38.11), "none": (83.9, 55.6, 45.0, 37.33),
    },
    "fcn-basic-no-addition": {
        "paper_name": "FCN-Basic-NoAddition", "params_m": 0.65, "storage": None, "infer_ms": 23.8,
        "median_frequency": (80.5, 58.6, 44.1, 31.96), "none": (82.3, 53.9, 44.2, 29.43),
    },
    "fcn-basic-no-dim-reduction": {
        "paper_name": "FCN-Basic-NoDimReduction", "params_m": 1.625, "storage": 64, "infer_ms": 44.8,
        "median_frequency": (84.1, 63.4, 50.1, 37.37), "none": (83.5, 57.3, 47.0, 37.13),
    },
    "fcn-basic-no-addition-no-dim-reduction": {
        "paper_name": "FCN-Basic-NoAddition-NoDimReduction", "params_m": 1.625, "storage": 0,
        "infer_ms": 43.9, "median_frequency": (80.5, 61.6, 45.9, 30.47), "none": (83.7, 54.8, 45.5, 33.17),
    },
}  # fmt: skip
