"""Plain reference SegNets for `segnet bench model --baseline`: the obvious way (nn.MaxPool2d and
nn.MaxUnpool2d with int64 indices, contiguous NCHW tensors, no tuning). Parameters are declared in the
same order as the project's models, so `copy_weights` moves weights between them by position."""

from torch import nn

from segnet.vgg import VGG16_BLOCKS


def _unit(cin: int, cout: int, k: int, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


class PlainSegNetBasic(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(*_unit(3 if i == 0 else 64, 64, 7)) for i in range(4))
        self.decoders = nn.ModuleList(nn.Sequential(*_unit(64, 64, 7, relu=False)) for _ in range(4))
        self.classifier = nn.Conv2d(64, num_classes, 1)
        self.pool, self.unpool = nn.MaxPool2d(2, 2, return_indices=True), nn.MaxUnpool2d(2, 2)

    def forward(self, x):
        stack = []
        for enc in self.encoders:
            x = enc(x)
            size = x.shape[-2:]
            x, idx = self.pool(x)
            stack.append((idx, size))
        for dec in self.decoders:
            idx, size = stack.pop()
            x = dec(self.unpool(x, idx, output_size=size))
        return self.classifier(x)


class PlainSegNet(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.encoders, self.decoders, ch = nn.ModuleList(), nn.ModuleList(), 3
        for widths in VGG16_BLOCKS:
            layers = []
            for w in widths:
                layers += _unit(ch, w, 3)
                ch = w
            self.encoders.append(nn.Sequential(*layers))
        for i in reversed(range(len(VGG16_BLOCKS))):
            widths = VGG16_BLOCKS[i]
            outs = list(widths[1:][::-1]) + [VGG16_BLOCKS[i - 1][-1] if i > 0 else 64]
            layers = []
            for cin, cout in zip(widths[::-1], outs):
                layers += _unit(cin, cout, 3)
            if i == 0:  # the last conv is the classifier
                layers = layers[:-3] + [nn.Conv2d(64, num_classes, 3, padding=1)]
            self.decoders.append(nn.Sequential(*layers))
        self.classifier = nn.Identity()  # the last decoder conv already maps to the classes
        self.pool, self.unpool = nn.MaxPool2d(2, 2, return_indices=True), nn.MaxUnpool2d(2, 2)

    forward = PlainSegNetBasic.forward


REFERENCES = {"segnet": PlainSegNet, "segnet-basic": PlainSegNetBasic}


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters and buffers by position (both models declare them in the same order)."""
    s, d = src.state_dict(), dst.state_dict()
    if [v.shape for v in s.values()] != [v.shape for v in d.values()]:
        raise ValueError("models differ in their parameter layout")
    dst.load_state_dict({k: v.clone() for k, v in zip(d, s.values())})


def build_reference(name: str, num_classes: int) -> nn.Module:
    return REFERENCES[name](num_classes)
