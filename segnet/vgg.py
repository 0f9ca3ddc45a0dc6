"""SegNet: the VGG16 encoder (13 convs) and its mirror-image decoder (13 convs), paper Fig. 2 and Sec. 3."""

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from segnet.errors import SegNetError
from segnet.layers import check_input_size, conv_bn, dropout_layer, he_init, pool, recomputed, unpool
from segnet.weights import load_tensors

# VGG16's convolution widths per block (configuration D of Simonyan & Zisserman).
VGG16_BLOCKS = [(64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)]
DROPOUT_BLOCKS = (2, 3, 4)  # Bayesian SegNet-Central: after encoders 3, 4, 5 and decoders 5, 4, 3 (0-based)


def encoder_block(in_ch: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers, ch = [], in_ch
    for w in widths:
        layers.append(conv_bn(ch, w, 3))
        ch = w
    return nn.Sequential(*layers)


def decoder_block(widths: tuple[int, ...], out_ch: int) -> nn.Sequential:
    """Mirror of an encoder block: same widths, the last conv narrows to the next (shallower) block."""
    outs = list(widths[1:][::-1]) + [out_ch]
    ins = list(widths[::-1])
    return nn.Sequential(*[conv_bn(i, o, 3) for i, o in zip(ins, outs)])


class SegNet(nn.Module):
    """The paper's SegNet: 13 + 13 convs with batch norm, decoders upsample by the encoder's pooling indices.

    The last decoder conv (conv1_1_D in the authors' Caffe model) maps 64 channels to the classes, which
    gives the 29.46M parameters of Table 6 for 11 classes. With `recompute=N`, the encoder and decoder
    blocks of the N largest resolutions keep only their inputs for backward and run forward again there:
    at 360x480, N=1 saves a fifth of a training step's memory for 4% more FLOPs, N=2 a third for 10%.

    `dropout=P` makes it Bayesian SegNet (Kendall, Badrinarayanan, Cipolla, BMVC 2017) in its "Central
    Enc-Dec" placement, the deepest half of the network: dropout on the pooled outputs of encoders 3, 4 and 5
    and on the outputs of decoders 5, 4 and 3 (the first three on the way up), where the authors'
    bayesian_segnet_train.prototxt (SegNet-Tutorial) has `encdrop3-5` and `decdrop5-3`.
    """

    num_pools: ClassVar[int] = 5  # segnet.models.SegmentationModel: the contract of every model
    storage_multiplier: int = 1  # pooling indices only

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.0, recompute: int = 0):
        super().__init__()
        if not 0 <= recompute <= len(VGG16_BLOCKS):
            raise SegNetError(
                f"recompute={recompute}: choose 0 (off) to {len(VGG16_BLOCKS)} resolution levels"
            )
        self.recompute = recompute
        self.encoders = nn.ModuleList()
        ch = in_channels
        for widths in VGG16_BLOCKS:
            self.encoders.append(encoder_block(ch, widths))
            ch = widths[-1]
        self.decoders = nn.ModuleList()
        for i in reversed(range(len(VGG16_BLOCKS))):
            out_ch = VGG16_BLOCKS[i - 1][-1] if i > 0 else VGG16_BLOCKS[0][0]
            self.decoders.append(decoder_block(VGG16_BLOCKS[i], out_ch))
        # The final decoder conv is the classifier: no batch norm, no ReLU.
        self.decoders[-1][-1] = nn.Conv2d(VGG16_BLOCKS[0][0], num_classes, 3, padding=1)
        self.dropout = dropout_layer(dropout)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x.shape[-2], x.shape[-1], self.num_pools)
        stack = []
        for i, enc in enumerate(self.encoders):
            again = self.training and i < self.recompute
            x, idx, size = pool(recomputed(enc, enc, x) if again else enc(x))
            stack.append((idx, size))
            if i in DROPOUT_BLOCKS:
                x = self.dropout(x)
        for j, dec in enumerate(self.decoders):
            idx, size = stack.pop()
            if self.training and len(self.decoders) - 1 - j < self.recompute:
                x = recomputed(self._unpool_decode, dec, x, idx, size, j)
            else:
                x = self._unpool_decode(x, idx, size, j)
            if len(self.encoders) - 1 - j in DROPOUT_BLOCKS:
                x = self.dropout(x)
        return x

    def _unpool_decode(self, x: torch.Tensor, idx: torch.Tensor, size: torch.Size, j: int) -> torch.Tensor:
        return self.decoders[j](unpool(x, idx, size))

    def load_vgg16(self, path: str | Path) -> None:
        """Initialise the encoder from a local VGG16 or VGG16-BN state dict in torchvision's key layout."""
        load_vgg16_encoder(self, path)


def _encoder_convs(model: SegNet) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    return [(unit[0], unit[1]) for block in model.encoders for unit in block]


def load_vgg16_encoder(model: SegNet, path: str | Path) -> None:
    """Copy torchvision `features.N.*` conv (and, for VGG16-BN, batch norm) weights into the encoder.

    Never downloads; loads with weights_only=True so the file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise SegNetError(f"VGG16 weights file {path} does not exist")
    state = load_tensors(path, str(path))
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SegNetError(f"{path} holds a {type(state).__name__}, expected a state dict")
    conv_ids = sorted(
        int(k.split(".")[1])
        for k, v in state.items()
        if k.startswith("features.") and k.endswith(".weight") and getattr(v, "ndim", 0) == 4
    )
    targets = _encoder_convs(model)
    if len(conv_ids) != len(targets):
        raise SegNetError(
            f"{path} has {len(conv_ids)} conv layers under 'features.', expected the 13 of VGG16 "
            "(torchvision's vgg16 or vgg16_bn key layout)"
        )
    with torch.no_grad():
        for n, (conv, bn) in zip(conv_ids, targets):
            w = state[f"features.{n}.weight"]
            if w.shape != conv.weight.shape:
                raise SegNetError(
                    f"{path}: features.{n}.weight has shape {tuple(w.shape)}, "
                    f"expected {tuple(conv.weight.shape)}"
                )
            conv.weight.copy_(w)
            bn_key = f"features.{n + 1}.running_mean"
            if bn_key in state:  # VGG16-BN: take its batch norm as well
                for name in ("weight", "bias", "running_mean", "running_var"):
                    src = state[f"features.{n + 1}.{name}"]
                    dst = getattr(bn, name)
                    if src.shape != dst.shape:
                        raise SegNetError(
                            f"{path}: features.{n + 1}.{name} has shape {tuple(src.shape)}, "
                            f"expected {tuple(dst.shape)}"
                        )
                    dst.copy_(src)
            else:  # plain VGG16 has a conv bias; fold it into the batch norm's shift
                b = state.get(f"features.{n}.bias")
                if b is not None:
                    if b.shape != bn.bias.shape:
                        raise SegNetError(f"{path}: features.{n}.bias has shape {tuple(b.shape)}")
                    bn.running_mean.copy_(-b)
