import math

import numpy as np
import pytest
import torch

from segnet.metrics import (
    ConfusionMatrix,
    accuracy_by_uncertainty,
    boundary_f1,
    boundary_f1_per_image,
    expected_calibration_error,
    segmentation_scores,
)


def test_scores_hand_computed_with_void():
    # 3 classes, void = 3. Ground truth / prediction, one 2x4 image.
    target = np.array([[[0, 0, 1, 1], [2, 2, 3, 3]]])
    pred = np.array([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    s = segmentation_scores(pred, target, num_classes=3, ignore_index=3)
    # non-void pixels: 6, correct: (0,0), (1,1) x2, (2,2) -> 4
    assert s["global_accuracy"] == pytest.approx(4 / 6)
    # recalls: class0 1/2, class1 2/2, class2 1/2
    assert s["class_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    # IoU: class0 tp1 / (2 + 2 - 1), class1 2 / (2 + 3 - 2), class2 1 / (2 + 1 - 1); void preds ignored
    ious = [1 / 3, 2 / 3, 1 / 2]
    assert s["per_class_iou"] == pytest.approx(ious)
    assert s["miou"] == pytest.approx(sum(ious) / 3)


def test_class_absent_from_both_maps_is_left_out_of_the_means():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 0], [1, 0]]])
    s = segmentation_scores(pred, target, num_classes=3, ignore_index=3)
    assert math.isnan(s["per_class_iou"][2])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["class_accuracy"] == pytest.approx((1 + 0.5) / 2)


def test_class_only_predicted_counts_in_miou_with_iou_zero():
    target = torch.tensor([[[0, 0], [0, 0]]])
    pred = torch.tensor([[[0, 0], [0, 1]]])
    s = segmentation_scores(pred, target, num_classes=2, ignore_index=5)
    assert s["per_class_iou"] == pytest.approx([3 / 4, 0.0])
    assert s["miou"] == pytest.approx(3 / 8)
    assert s["class_accuracy"] == pytest.approx(3 / 4)  # recall only over ground-truth classes


def test_all_void_gives_nan_not_a_crash():
    s = segmentation_scores(np.zeros((1, 2, 2)), np.full((1, 2, 2), 11), num_classes=11)
    assert math.isnan(s["global_accuracy"]) and math.isnan(s["miou"])


def test_confusion_matrix_accumulates_like_one_call_and_sums_across_workers():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 11, (6, 20, 30))
    target = rng.integers(0, 12, (6, 20, 30))
    whole = segmentation_scores(pred, target, num_classes=11)
    worker_a, worker_b = ConfusionMatrix(11), ConfusionMatrix(11)
    for i in range(0, 6, 2):
        worker_a.update(pred[i : i + 1], target[i : i + 1])
        worker_b.update(torch.from_numpy(pred[i + 1 : i + 2]), torch.from_numpy(target[i + 1 : i + 2]))
    summed = ConfusionMatrix(11)
    summed.matrix = worker_a.matrix + worker_b.matrix  # what all_reduce(SUM) does
    assert summed.scores()["miou"] == pytest.approx(whole["miou"])
    assert summed.scores()["global_accuracy"] == pytest.approx(whole["global_accuracy"])


def _two_region_map(h=100, w=120, split=60):
    m = np.zeros((h, w), dtype=np.int64)
    m[:, split:] = 1
    return m


def test_bf_is_one_for_identical_maps():
    t = _two_region_map()
    t[10:30, 10:30] = 2
    assert boundary_f1(t[None], t[None], num_classes=11) == pytest.approx(1.0)


def test_bf_tolerates_shifts_within_and_drops_beyond_the_tolerance():
    h, w = 100, 120  # diagonal 156.2 -> tolerance 1.17 px
    t = _two_region_map(h, w, 60)
    near = _two_region_map(h, w, 61)
    far = _two_region_map(h, w, 70)
    assert boundary_f1(near[None], t[None], num_classes=11) == pytest.approx(1.0)
    assert boundary_f1(far[None], t[None], num_classes=11) == pytest.approx(0.0)


def test_bf_ignores_predictions_on_void_pixels():
    t = _two_region_map()
    p = t.copy()
    t[:, :10] = 11  # void strip
    p[:, :10] = 1  # wrong class there, but it is void in the ground truth
    assert boundary_f1(p[None], t[None], num_classes=11) == pytest.approx(1.0)


def test_bf_penalises_a_hallucinated_class():
    t = _two_region_map()
    p = t.copy()
    p[40:50, 20:30] = 2  # a class absent from the ground truth
    per_image = boundary_f1_per_image(p[None], t[None], num_classes=3)
    # class 2: F1 0; classes 0 and 1 partly wrong boundary
    assert per_image[0] < 2 / 3 + 1e-9


def test_bf_averages_per_image_then_over_images():
    t = _two_region_map()
    far = _two_region_map(split=90)
    both = boundary_f1(np.stack([t, far]), np.stack([t, t]), num_classes=11)
    assert both == pytest.approx((1.0 + boundary_f1(far[None], t[None], num_classes=11)) / 2)


def _perturbed(target: np.ndarray, seed: int) -> np.ndarray:
    """A prediction that differs from the labels as a model's does: shifted edges, speckle, a blob."""
    rng = np.random.default_rng(seed)
    pred = np.roll(target, rng.integers(1, 8), axis=2).copy()
    noise = rng.random(pred.shape) < 0.03
    pred[noise] = rng.integers(0, 11, int(noise.sum()))
    pred[:, 50:90, 100:180] = rng.integers(0, 11)
    pred[pred == 11] = 0
    return pred


@pytest.fixture(scope="module")
def camvid_test_labels(camvid_dir):
    from PIL import Image

    files = sorted((camvid_dir / "testannot").glob("*.png"))[::40]  # 6 labels across the split
    return np.stack([np.asarray(Image.open(f)) for f in files]).astype(np.int64)


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_bf_equals_the_scipy_bf_on_camvid_test_labels(camvid_test_labels, seed):
    from segnet.metrics import boundary_f1_torch

    pred = _perturbed(camvid_test_labels, seed)
    expected = boundary_f1_per_image(pred, camvid_test_labels, 11)
    got = boundary_f1_torch(torch.from_numpy(pred), torch.from_numpy(camvid_test_labels), 11).numpy()
    assert 0.2 < expected.mean() < 0.95  # a real, imperfect prediction
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_torch_bf_matches_scipy_on_edge_cases():
    from segnet.metrics import boundary_f1_torch

    t = _two_region_map()
    cases = [
        (t, t),  # identical
        (_two_region_map(split=61), t),  # within tolerance
        (_two_region_map(split=90), t),  # beyond it
        (np.zeros_like(t), t),  # a class never predicted
        (t, np.full_like(t, 11)),  # all void: no class, NaN
    ]
    for p, g in cases:
        expected = boundary_f1_per_image(p[None], g[None], 11)
        got = boundary_f1_torch(torch.from_numpy(p[None]), torch.from_numpy(g[None]), 11).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, equal_nan=True)


def _meter_worker(rank: int, world: int, init: str, pred, target, out):
    import torch.distributed as dist

    from segnet.metrics import SegmentationMeter

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    meter = SegmentationMeter(11)
    meter.update(torch.from_numpy(pred[rank::world]), torch.from_numpy(target[rank::world]))
    meter.all_reduce()
    torch.save({"matrix": meter.matrix, "scores": meter.compute()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_meter_all_reduce_over_two_processes_equals_one_pass(camvid_test_labels, tmp_path):
    """Each image scored once: the two workers' reduced meter equals a single meter over all images."""
    from segnet.metrics import SegmentationMeter

    pred = _perturbed(camvid_test_labels, 3)
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(
        _meter_worker, args=(2, init, pred, camvid_test_labels, tmp_path / "meter"), nprocs=2
    )
    whole = SegmentationMeter(11)
    whole.update(torch.from_numpy(pred), torch.from_numpy(camvid_test_labels))
    expected = whole.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"meter.{rank}", weights_only=True)
        assert torch.equal(got["matrix"], whole.matrix)
        assert got["scores"]["bf"] == pytest.approx(expected["bf"], abs=1e-12)
        assert got["scores"]["miou"] == pytest.approx(expected["miou"], abs=1e-12)
    assert expected["bf"] == pytest.approx(
        float(np.nanmean(boundary_f1_per_image(pred, camvid_test_labels, 11)))
    )


def test_expected_calibration_error_by_hand():
    """15 equal-width bins ((m-1)/15, m/15]. Six pixels in three bins:
    bin (0.8, 0.8667]: confidences 0.85, 0.85, correct 1 of 2 -> |0.5 - 0.85| = 0.35, weight 2/6
    bin (0.9333, 1]:   confidences 0.95, 1.0, 0.95, correct 3 of 3 -> |1 - 0.9667| = 0.0333, weight 3/6
    bin (0.4, 0.4667]: confidence 0.45, wrong -> |0 - 0.45| = 0.45, weight 1/6
    ECE = (2 * 0.35 + 3 * 0.1 / 3 + 0.45) / 6 = (0.7 + 0.1 + 0.45) / 6."""
    confidence = torch.tensor([0.85, 0.85, 0.95, 1.0, 0.95, 0.45])
    correct = torch.tensor([True, False, True, True, True, False])
    assert expected_calibration_error(confidence, correct) == pytest.approx(1.25 / 6)
    assert expected_calibration_error(torch.full((4,), 0.9), torch.tensor([1, 1, 1, 0])) == pytest.approx(
        0.15
    )  # one bin: accuracy 0.75 against confidence 0.9


def test_accuracy_by_uncertainty_deciles_by_hand():
    """20 pixels, 2 per decile, least uncertain first: deciles 1-3 right, 4-8 half right, 9-10 wrong."""
    uncertainty = torch.arange(20) / 20 + 0.01  # distinct levels, given shuffled
    correct = torch.tensor([1] * 6 + [1, 0] * 5 + [0] * 4, dtype=torch.bool)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    got = accuracy_by_uncertainty(uncertainty[order], correct[order])
    assert got == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0, 0])


def test_a_decile_edge_inside_tied_pixels_splits_them_by_their_accuracy():
    """5 pixels in 2 parts (2.5 each): u = 0.1 (right), 0.5 x3 (one right), 0.9 (wrong). Part 1 holds the
    0.1 pixel and 1.5 of the tied ones (accuracy 1/3): (1 + 0.5) / 2.5; part 2 the rest: 0.5 / 2.5."""
    got = accuracy_by_uncertainty([0.1, 0.5, 0.5, 0.5, 0.9], [True, True, False, False, False], parts=2)
    assert got == pytest.approx([1.5 / 2.5, 0.5 / 2.5])


def test_calibrated_meter_leaves_void_out_and_reports_ece_and_deciles():
    """Two classes and void (2): the mean softmax says class 0 with 0.9 on three pixels (two right) and
    class 1 with 0.6 on a fourth (right); the void pixel is not counted. Deciles of 0.4 pixels: the three
    tied least uncertain fill 7.5 of them at accuracy 2/3, the eighth is half theirs, half the fourth's."""
    from segnet.bayesian import normalised_entropy
    from segnet.metrics import SegmentationMeter

    p0 = torch.tensor([0.9, 0.9, 0.9, 0.4, 0.9])
    probs = torch.stack([p0, 1 - p0]).view(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 1, 1, 2]]])
    meter = SegmentationMeter(2, calibrated=True)
    meter.update(probs.argmax(1), target, probs, normalised_entropy(probs))
    s = meter.compute()
    assert s["ece"] == pytest.approx((abs(2 - 2.7) + abs(1 - 0.6)) / 4)
    assert s["accuracy_by_uncertainty"] == pytest.approx([2 / 3] * 7 + [(2 / 3 + 1) / 2, 1, 1])
