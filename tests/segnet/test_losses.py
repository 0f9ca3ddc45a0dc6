import numpy as np
import pytest
import torch

from segnet import SegNetError, class_weights, segmentation_loss


def test_median_frequency_follows_the_formula():
    counts = np.array([100, 10, 50, 0])
    image_totals = np.array([1000, 200, 500, 0])
    w = class_weights(counts, image_totals, "median_frequency")
    freq = np.array([0.1, 0.05, 0.1])
    assert w[:3] == pytest.approx(np.median(freq) / freq)
    assert w[3] == 0  # never seen


def test_inverse_frequency_gives_fair_share_weight_one():
    w = class_weights([100, 100, 200], mode="inverse_frequency")
    assert w == pytest.approx([400 / 300, 400 / 300, 400 / 600])


def test_none_is_all_ones():
    assert class_weights([5, 1], mode="none").tolist() == [1, 1]


def test_unknown_mode_names_the_modes():
    with pytest.raises(SegNetError, match="median_frequency"):
        class_weights([1, 2], [3, 4], "log")


def test_loss_ignores_void_and_applies_weights():
    logits = torch.zeros(1, 2, 1, 3, requires_grad=True)
    target = torch.tensor([[[0, 1, 11]]])
    unweighted = segmentation_loss(ignore_index=11)(logits, target)
    assert unweighted.item() == pytest.approx(np.log(2))  # void pixel left out
    weighted = segmentation_loss([3.0, 1.0], ignore_index=11)(logits, target)
    assert weighted.item() == pytest.approx(np.log(2))  # weighted mean of equal losses
    logits2 = torch.tensor([[[[5.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]])
    w = segmentation_loss([3.0, 1.0], ignore_index=11)(logits2, target)
    l0, l1 = -torch.log_softmax(torch.tensor([5.0, 0.0]), 0)[0], np.log(2)
    assert w.item() == pytest.approx((3 * l0.item() + l1) / 4)
