import json

import pytest
import torch

from pipelines.core.reference import build_reference, copy_weights
from segnet import build_model


@pytest.mark.parametrize("name, size", [("segnet-basic", (37, 53)), ("segnet", (64, 70))])
def test_channels_last_model_matches_the_plain_reference(name, size):
    """Speed work must never change results: same outputs and gradients as the obvious implementation.

    Batch norm uses its running statistics here: in training mode, batch statistics over the deepest maps
    (a few pixels) amplify float rounding between memory layouts until pooling picks other maxima."""
    torch.manual_seed(0)
    ours, ref = build_model(name, num_classes=11).eval(), build_reference(name, 11).eval()
    copy_weights(ours, ref)
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, *size)
    y = torch.randint(0, 11, (2, *size))
    outs = []
    for model, inp in ((ours, x.contiguous(memory_format=torch.channels_last)), (ref, x)):
        out = model(inp)
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), n


def test_bench_model_prints_measured_figures(segnet_cli):
    args = ["bench", "model", "--model", "segnet-basic", "--image-size", "32x48", "--batch-size", "1"]
    r = segnet_cli(*args, "--steps", "1", "--baseline", "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(r.stdout)
    for key in ("seconds_per_step", "flops_per_image", "peak_flops_per_s", "speed_vs_baseline"):
        assert figures[key] > 0, key
    assert (figures["mfu"] is None) == ("mfu_error" in figures)  # an MFU above 100% is refused
    assert figures["mfu"] is None or 0 < figures["mfu"] <= 1
    assert 0 < figures["matmul_spread"] <= 1 and 0 < figures["peak_spread"] <= 1
    assert figures["peak_flops_per_s"] == max(p["flops_per_s"] for p in figures["measured_peaks"].values())
    # a training step (forward and backward) costs about three forward passes
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_model("segnet-basic", num_classes=11)(torch.randn(1, 3, 32, 48))
    assert 2.5 < figures["flops_per_image"] / counter.get_total_flops() < 3.5
