"""Bayesian SegNet: dropout where the paper puts it (and nowhere in the state dict), Monte Carlo sampling with
dropout on and batch norm in eval mode, its chunking and its refusals."""

import math
import re

import pytest
import torch
from torch import nn

from segnet import SegNetError, build_model
from segnet.bayesian import check_samples, dropout_sampling, mc_softmax, normalised_entropy
from segnet.models import MODELS

SIZE = (64, 96)


@pytest.mark.parametrize("name", list(MODELS))
def test_dropout_leaves_the_state_dict_as_it_was_so_old_checkpoints_load(name):
    torch.manual_seed(0)
    old = build_model(name, num_classes=11).state_dict()
    bayesian = build_model(name, num_classes=11, dropout=0.5)
    assert list(bayesian.state_dict()) == list(old)
    bayesian.load_state_dict(old)  # strict: every key, no extra one


def dropped_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """The (H, W) of every map that went through a dropout layer in one training-mode pass, in order."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, inputs, _out: seen.append(tuple(inputs[0].shape[-2:])))
        for m in model.modules()
        if isinstance(m, nn.Dropout)
    ]
    model.train()(torch.randn(1, 3, *SIZE))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "name, expected",
    [
        # encoders 3 and 4 (pooled: 1/8, 1/16), then decoders 4 and 3 (back to 1/8, 1/4)
        ("segnet-basic", [(8, 12), (4, 6), (8, 12), (16, 24)]),
        ("fcn-basic", [(8, 12), (4, 6), (8, 12), (16, 24)]),
        # encoders 3, 4 and 5 (pooled: 1/8, 1/16, 1/32), then decoders 5, 4 and 3 (back to 1/16, 1/8, 1/4)
        ("segnet", [(8, 12), (4, 6), (2, 3), (4, 6), (8, 12), (16, 24)]),
    ],
)
def test_dropout_follows_the_central_encoders_and_decoders(name, expected):
    assert dropped_sizes(build_model(name, num_classes=11, dropout=0.5)) == expected
    assert dropped_sizes(build_model(name, num_classes=11)) == []


def test_samples_differ_batch_norm_stays_in_eval_and_modes_are_put_back():
    """One image, 6 samples in batches of 4: every sample's softmax differs from every other (its own
    dropout masks), no batch norm is in training mode or moves its running statistics, and the mean is
    the mean of the samples."""
    torch.manual_seed(0)
    model = build_model("segnet-basic", num_classes=11, dropout=0.5).train()
    bn = model.encoder.blocks[0][1]
    running = bn.running_mean.clone()
    softmaxes, bn_modes, batches = [], [], []

    def seen(module, inputs, out):  # a forward hook: returns None, so the output is kept
        if module is bn:
            bn_modes.append(module.training)
            batches.append(len(inputs[0]))
        else:
            softmaxes.extend(out.softmax(1))

    bn.register_forward_hook(seen)
    model.classifier.register_forward_hook(seen)
    mean = mc_softmax(model, torch.randn(1, 3, *SIZE), samples=6, batch=4)
    assert batches == [4, 2] and bn_modes == [False, False]
    assert torch.equal(bn.running_mean, running)
    assert all(not torch.allclose(a, b) for i, a in enumerate(softmaxes) for b in softmaxes[i + 1 :])
    torch.testing.assert_close(mean[0], torch.stack(softmaxes).mean(0))
    assert all(m.training for m in model.modules())  # as it was before sampling


def test_dropout_sampling_turns_only_dropout_on():
    model = build_model("segnet", num_classes=11, dropout=0.5)
    with dropout_sampling(model):
        on = {type(m) for m in model.modules() if m.training}
    assert on == {nn.Dropout}  # batch norms, convs, the model itself: eval


def test_predictive_entropy_is_normalised_by_log_k():
    k = 11
    uniform = torch.full((1, k, 1, 1), 1 / k)
    certain = torch.zeros(1, k, 1, 1)
    certain[0, 3] = 1
    two = torch.zeros(1, k, 1, 1)
    two[0, :2] = 0.5
    got = normalised_entropy(torch.cat([uniform, certain, two])).flatten()
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, math.log(2) / math.log(k)]))


@pytest.mark.parametrize(
    "samples, limit, dropout, message",
    [
        (8, 64, False, "has no dropout (trained with dropout 0)"),
        (65, 64, True, "mc_samples 65: expected 1 to 64 (max_mc_samples)"),
        (0, 64, True, "mc_samples 0: expected 1 to 64"),
        (9, 8, True, "expected 1 to 8"),
    ],
)
def test_too_many_samples_or_a_model_without_dropout_are_refused_in_one_line(
    samples, limit, dropout, message
):
    with pytest.raises(SegNetError, match=re.escape(message)) as e:
        check_samples(samples, limit, dropout)
    assert "\n" not in str(e.value)
    check_samples(1, limit, dropout=False)  # one deterministic pass is always allowed
