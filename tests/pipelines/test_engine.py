import time

import numpy as np
import pytest
import torch

from data_prep.device_augment import AugmentConfig, DeviceBatches
from pipelines.config import TrainConfig
from pipelines.core import engine
from segnet import SegNetError, build_model, segmentation_loss


def _split(n=5, h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), rng.integers(0, 12, (n, h, w), dtype=np.uint8)


def test_train_epoch_reports_loss_speed_and_data_wait():
    torch.manual_seed(0)
    model = build_model("segnet-basic", num_classes=11)
    images, labels = _split()
    batches = DeviceBatches(
        images, labels, 2, (32, 48), augment=AugmentConfig(32, 48), drop_last=True, void=11
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = engine.train_epoch(model, batches, segmentation_loss(ignore_index=11), opt, torch.device("cpu"))
    assert np.isfinite(stats["train_loss"]) and stats["train_images_per_s"] > 0
    assert 0 <= stats["data_wait_fraction"] < 1


def test_data_wait_is_the_share_of_the_epoch_spent_waiting_for_batches():
    """Batches that take 50 ms each to arrive, steps of 10 ms: about 5/6 of the time is waiting."""

    def slow_batches(n):
        for _ in range(n):
            time.sleep(0.05)
            yield torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 8, dtype=torch.long)

    timed = engine.TimedBatches(slow_batches(5), torch.device("cpu"))
    for x, _ in timed:
        assert x.dtype == torch.float32  # moved and normalised as the model takes it
        time.sleep(0.01)
    rates = timed.rates()
    assert timed.seen == 8  # the first batch is not counted: its step may compile or warm up
    assert 0.7 < rates["data_wait_fraction"] < 0.95
    assert 8 / 0.4 < rates["train_images_per_s"] < 8 / 0.2


def test_compile_setting_is_checked_and_auto_means_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.use_compile("auto", cuda) and not engine.use_compile("auto", cpu)
    assert engine.use_compile("on", cpu) and not engine.use_compile("off", cuda)
    with pytest.raises(SegNetError, match="compile 'yes': choose one of auto, on, off"):
        TrainConfig(compile="yes")  # the setting is checked where it is defined


@pytest.mark.slow
def test_compiled_model_matches_eager_and_compiles_a_bounded_number_of_times():
    """Outputs within 1e-4 and gradients within 1e-3 (relative to their norm) of eager, in fp32 on the
    CPU; two epochs and evaluations with a smaller last batch compile no more graphs than the first."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = build_model("segnet-basic", num_classes=11).to(memory_format=torch.channels_last)
    compiled = build_model("segnet-basic", num_classes=11).to(memory_format=torch.channels_last)
    compiled.load_state_dict(eager.state_dict())
    engine.compile_model(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys

    x = torch.randn(2, 3, 32, 48).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (2, 32, 48))
    outs, grads = [], []
    for net in (eager, compiled):
        net.train()
        out = net(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert (outs[1] - outs[0]).norm() / outs[0].norm() < 1e-4
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-3

    graphs = counters["stats"]["unique_graphs"]  # the train step's, at the shape the epochs train at
    images, labels = _split(n=5)
    train = DeviceBatches(images, labels, 2, (32, 48), augment=AugmentConfig(32, 48), drop_last=True, void=11)
    val = DeviceBatches(images, labels, 2, (32, 48))  # batches of 2, 2, 1
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
    cpu = torch.device("cpu")

    def epoch(e):
        train.set_epoch(e)
        engine.train_epoch(compiled, train, segmentation_loss(ignore_index=11), opt, cpu, channels_last=True)
        engine.evaluate(compiled, val, cpu, 11, channels_last=True)
        return counters["stats"]["unique_graphs"]

    after_first = epoch(0)
    assert 1 <= after_first - graphs + 1 <= 4  # train, eval, eval's last batch (and a guard on the mode)
    assert epoch(1) == after_first  # no recompile per step or per epoch


def test_labels_of_mixed_sizes_are_each_scored_at_their_own_size():
    """A validation batch whose labels differ in size (collate_eval gives them as a list) scores the same
    confusion matrix and keeps the same examples as the images evaluated one at a time."""
    from data_prep.augment import collate_eval

    torch.manual_seed(0)
    model = build_model("segnet-basic", num_classes=3).eval()
    samples = [
        (torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8), torch.randint(0, 4, (h, w)))
        for h, w in ((32, 48), (40, 64), (24, 30))
    ]
    batch = collate_eval(samples)
    assert isinstance(batch[1], list)
    cpu = torch.device("cpu")
    together, kept = engine.evaluate(model, [batch], cpu, 3, keep=3)
    alone, kept_alone = engine.evaluate(model, [collate_eval([s]) for s in samples], cpu, 3, keep=3)
    assert torch.equal(together.matrix, alone.matrix) and torch.equal(together.bf_sum, alone.bf_sum)
    assert together.matrix.sum() == sum(int((y < 3).sum()) for _, y in samples)  # every non-void pixel
    assert [tuple(p.shape) for _, p, _ in kept] == [(32, 48), (40, 64), (24, 30)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(kept, kept_alone))
