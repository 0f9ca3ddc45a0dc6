"""The one model registry: name -> constructor, as in the paper's naming (Table 1 and Table 6), and the
contract every model in it keeps (`SegmentationModel`)."""

from functools import partial
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from segnet.basic import BilinearInterpolation, FCNBasic, SegNetBasic
from segnet.errors import SegNetError
from segnet.vgg import SegNet


@runtime_checkable
class SegmentationModel(Protocol):
    """What a model in `MODELS` provides, as segmentation_models_pytorch's `SegmentationModel` states its own.

    An `nn.Module` built as `Model(num_classes=..., in_channels=..., **options)` (what `build_model` calls),
    whose `forward` maps a float (N, in_channels, H, W) batch to (N, num_classes, H, W) logits at the
    input's own size, for any H and W of at least `2 ** num_pools`. docs/extending.md adds one.
    """

    num_pools: ClassVar[int]
    """How many times the encoder halves the map. A class attribute: `min_input_size` reads it from the
    constructor, before a model is built, and the checks refuse an image size below 2**num_pools."""
    storage_multiplier: int
    """Table 1's storage multiplier: the encoder memory the decoder keeps, relative to the first layer's
    pooling indices (1 = indices only, 0 = nothing, 64 = every feature map). May depend on the options."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


MODELS = {
    "segnet": SegNet,
    "segnet-basic": SegNetBasic,
    "segnet-basic-encoder-addition": partial(SegNetBasic, encoder_addition=True),
    "segnet-basic-single-channel-decoder": partial(SegNetBasic, single_channel=True),
    "fcn-basic": FCNBasic,
    "fcn-basic-no-addition": partial(FCNBasic, addition=False),
    "fcn-basic-no-dim-reduction": partial(FCNBasic, dim_reduction=False),
    "fcn-basic-no-addition-no-dim-reduction": partial(FCNBasic, addition=False, dim_reduction=False),
    "bilinear-interpolation": BilinearInterpolation,
}


def list_models() -> list[str]:
    return list(MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3, **options) -> nn.Module:
    """Build a model by name; options go to its constructor (e.g. `dropout`, `vgg16_weights` for segnet)."""
    if name not in MODELS:
        raise SegNetError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    vgg16_weights = options.pop("vgg16_weights", None)
    try:
        model = MODELS[name](num_classes=num_classes, in_channels=in_channels, **options)
    except TypeError as e:
        raise SegNetError(f"model {name!r} does not take options {sorted(options)}: {e}") from e
    if vgg16_weights is not None:
        if not isinstance(model, SegNet):
            raise SegNetError(f"vgg16_weights only applies to 'segnet', not {name!r}")
        model.load_vgg16(vgg16_weights)
    return model


def model_from_meta(meta: dict, vgg16_weights: bool = False) -> nn.Module:
    """The untrained model a checkpoint's meta.json describes: its name, class count and constructor options.
    The one way a saved model is rebuilt (checkpoints, the logged pyfunc, the benches); the encoder's VGG16
    weights are loaded only when asked, since a checkpoint's own weights replace them."""
    cfg = meta["config"]
    options = {key: cfg[key] for key in ("dropout", "recompute") if cfg.get(key)}
    if vgg16_weights and cfg.get("vgg16_weights"):
        options["vgg16_weights"] = cfg["vgg16_weights"]
    return build_model(cfg["model"], num_classes=meta["num_classes"], **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_summary(num_classes: int) -> list[dict]:
    """Name, parameter count and storage multiplier of every model, for `segnet models`."""
    rows = []
    for name in MODELS:
        model = build_model(name, num_classes=num_classes)
        rows.append(
            {
                "name": name,
                "parameters": count_parameters(model),
                "storage_multiplier": model.storage_multiplier,
            }
        )
    return rows


def summary_table(rows: list[dict]) -> str:
    """`model_summary` as the table `segnet models` prints."""
    text = [f"{'model':<40} {'parameters':>12} {'(M)':>7} storage"]
    for r in rows:
        p = r["parameters"]
        text.append(f"{r['name']:<40} {p:>12,} {p / 1e6:>7.3f} {r['storage_multiplier']:>7}")
    return "\n".join(text)


def min_input_size(name: str) -> int:
    """The smallest height and width the model takes: every pooling halves the map."""
    ctor = MODELS[name]
    return 2 ** getattr(ctor, "func", ctor).num_pools
