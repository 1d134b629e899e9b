"""IoU at every hierarchy level against hand-computed values and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiposeg.hierarchy import Hierarchy
from hiposeg.metrics import ConfusionMatrix, build_report, iou_per_class, map_confusion


def three_level() -> Hierarchy:
    """parts a0 a1 (-> A), b0 b1 (-> B), c0 (-> C); A, B -> thing; C -> stuff."""
    parts = [("a0", "A"), ("a1", "A"), ("b0", "B"), ("b1", "B"), ("c0", "C")]
    return Hierarchy.from_dict({
        "name": "toy", "source": "test",
        "levels": [
            {"name": "part", "classes": [{"id": i, "name": n, "color": [i, i, i], "parent": p}
                                         for i, (n, p) in enumerate(parts)]},
            {"name": "object", "classes": [{"id": 0, "name": "A", "color": [1, 0, 0], "parent": "thing"},
                                           {"id": 1, "name": "B", "color": [0, 1, 0], "parent": "thing"},
                                           {"id": 2, "name": "C", "color": [0, 0, 1], "parent": "stuff"}]},
            {"name": "kind", "classes": [{"id": 0, "name": "thing", "color": [9, 9, 9]},
                                         {"id": 1, "name": "stuff", "color": [8, 8, 8]}]},
        ],
        "raw": {"ignore": [255]},
    })


def report_for(gt: list[int], pred: list[int], h: Hierarchy) -> dict:
    cm = ConfusionMatrix(h.num_fine)
    cm.update(torch.tensor(pred), torch.tensor(gt), ignore_index=255)
    return build_report(cm.numpy(), h)


def test_hand_computed_fine_coarse_and_top_levels():
    h = three_level()
    a0, a1, b0, b1 = 0, 1, 2, 3
    gt = [a0, a0, a1, b0, b1, 255]
    pred = [a0, a1, a1, b1, b1, a0]  # the last pixel is GT-ignore: excluded entirely
    rep = report_for(gt, pred, h)
    fine = rep["levels"]["fine"]
    # a0: tp 1, fn 1 -> 1/2; a1: tp 1, fp 1 -> 1/2; b0: tp 0, fn 1 -> 0; b1: tp 1, fp 1 -> 1/2; c0 absent -> null
    assert fine["IoU"] == {"a0": 50.0, "a1": 50.0, "b0": 0.0, "b1": 50.0, "c0": None}
    assert fine["mIoU"] == pytest.approx(37.5)
    assert fine["pixel_accuracy"] == pytest.approx(60.0)
    assert fine["pixels"] == 5
    coarse = rep["levels"]["coarse"]  # every confusion stays inside its object: all correct
    assert coarse["level"] == "object"
    assert coarse["IoU"] == {"A": 100.0, "B": 100.0, "C": None}
    assert coarse["mIoU"] == pytest.approx(100.0)
    kind = rep["levels"]["kind"]
    assert kind["IoU"] == {"thing": 100.0, "stuff": None}
    assert list(rep["levels"]) == ["fine", "coarse", "kind"]


def test_the_report_carries_each_levels_confusion_matrix():
    """report.json holds the counts behind every level's IoU (rows: ground truth, columns: prediction then
    "other"), so pictures need no second evaluation."""
    h = three_level()
    rep = report_for([0, 0, 1, 2, 4, 255], [0, 1, 1, 255, 2, 3], h)
    assert rep["levels"]["fine"]["confusion"] == [[1, 1, 0, 0, 0, 0],   # a0: a0, a1
                                                  [0, 1, 0, 0, 0, 0],   # a1: a1
                                                  [0, 0, 0, 0, 0, 1],   # b0: other (255)
                                                  [0, 0, 0, 0, 0, 0],
                                                  [0, 0, 1, 0, 0, 0]]   # c0: b0
    assert rep["levels"]["coarse"]["confusion"] == [[3, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]  # A A A; B other; C->B
    assert rep["levels"]["kind"]["confusion"] == [[3, 0, 1], [1, 0, 0]]


def test_cross_object_confusion_counts_at_coarse_level():
    h = three_level()
    gt = [0, 0, 2, 4]      # a0 a0 b0 c0
    pred = [2, 0, 2, 4]    # a0 predicted as b0 once
    rep = report_for(gt, pred, h)
    # coarse: GT A A B C, pred B A B C -> A: tp1 fn1 -> 50; B: tp1 fp1 -> 50; C: 100
    assert rep["levels"]["coarse"]["IoU"] == {"A": 50.0, "B": 50.0, "C": 100.0}
    # kind: GT thing x3, stuff; pred thing x3, stuff -> all correct
    assert rep["levels"]["kind"]["IoU"] == {"thing": 100.0, "stuff": 100.0}


def test_out_of_range_prediction_is_a_false_negative_only():
    """As the Cityscapes script: a void prediction (255) on a valid pixel is FN of the true class and FP of none."""
    h = three_level()
    rep = report_for([0, 0, 1], [0, 255, 1], h)
    assert rep["levels"]["fine"]["IoU"]["a0"] == 50.0  # tp 1, fn 1
    assert rep["levels"]["fine"]["IoU"]["a1"] == 100.0  # untouched
    assert rep["levels"]["fine"]["pixel_accuracy"] == pytest.approx(200 / 3)
    assert rep["levels"]["coarse"]["IoU"]["A"] == pytest.approx(200 / 3)


def test_derived_levels_equal_bruteforce_on_mapped_maps():
    h = three_level()
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=2000)
    gt[rng.random(2000) < 0.1] = 255
    pred = rng.integers(0, 5, size=2000)
    cm = ConfusionMatrix(5)
    cm.update(torch.from_numpy(pred), torch.from_numpy(gt), 255)
    for level in ("object", "kind"):
        lut = h.ancestor_lut("part", level)
        k = h.num_classes(level)
        valid = gt != 255
        g, p = lut[gt[valid]], lut[pred[valid]]
        brute = np.zeros((k, k + 1), dtype=np.int64)
        np.add.at(brute, (g, p), 1)
        derived = map_confusion(cm.numpy(), lut, k)
        np.testing.assert_array_equal(derived, brute)
        # IoU from the plain definition |GT ∩ P| / |GT ∪ P| per class
        for c in range(k):
            inter = np.sum((g == c) & (p == c))
            union = np.sum((g == c) | (p == c))
            expect = np.nan if union == 0 else inter / union
            np.testing.assert_allclose(iou_per_class(derived)[c], expect)


def test_accumulates_over_batches_not_per_image_average():
    """Dataset-level accumulation: two images are pooled, not averaged per image."""
    h = three_level()
    cm = ConfusionMatrix(5)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]), 255)  # image 1: a0 perfect (IoU 1)
    cm.update(torch.tensor([1]), torch.tensor([0]), 255)                    # image 2: a0 missed (IoU 0)
    rep = build_report(cm.numpy(), h)
    assert rep["levels"]["fine"]["IoU"]["a0"] == pytest.approx(80.0)  # 4 / 5, not mean(100, 0) = 50
    assert rep["levels"]["fine"]["IoU"]["a1"] == pytest.approx(0.0)


def test_cityscapes_category_iou_matches_official_semantics():
    """Category IoU = IoU after mapping both maps to categories (cityscapesScripts getIouScoreForCategory)."""
    h = Hierarchy.load("cityscapes")
    # road(0) predicted as sidewalk(1): wrong class, right category (flat)
    # car(13) predicted as truck(14): wrong class, right category (vehicle)
    # person(11) predicted as road(0): wrong category
    gt = [0, 0, 13, 13, 11, 255]
    pred = [1, 0, 14, 13, 0, 5]
    rep = report_for(gt, pred, h)
    cat = rep["levels"]["coarse"]["IoU"]
    assert cat["flat"] == pytest.approx(200 / 3)   # tp 2, fp 1 (person->road)
    assert cat["vehicle"] == 100.0
    assert cat["human"] == 0.0
    assert cat["sky"] is None
    fine = rep["levels"]["fine"]["IoU"]
    assert fine["road"] == pytest.approx(100 / 3)  # tp 1, fn 1 (->sidewalk), fp 1 (person)
    assert fine["pole"] is None  # the prediction 5 on an ignore pixel does not count


def test_invalid_ground_truth_is_never_scored_and_is_named_with_values_and_counts():
    from hiposeg.errors import UserError

    k, ignore = 3, 255
    target = torch.tensor([[[0, 1, 2, 255], [7, 7, 9, 1]], [[0, 0, 1, 1], [2, 2, 2, 2]]])
    pred = torch.tensor([[[0, 1, 2, 0], [0, 1, 2, 1]], [[0, 0, 1, 1], [2, 2, 2, 2]]])
    cm = ConfusionMatrix(k)
    cm.update(pred, target, ignore, files=["a.png", "b.png"])
    clean = ConfusionMatrix(k)
    keep = (target != 7) & (target != 9)
    clean.update(pred[keep], target[keep], ignore)
    assert torch.equal(cm.mat, clean.mat)  # the invalid pixels are in no row and no column
    assert cm.invalid == {"a.png": {7: 2, 9: 1}}
    with pytest.raises(UserError, match=r"neither a class \(0\.\.2\) nor the ignore value 255 \(3 pixels in 1 "
                                        r"file\(s\)\): a\.png: 7 \(2 px\), 9 \(1 px\)"):
        cm.check_ground_truth("error", ignore)
    assert cm.check_ground_truth("ignore", ignore) == {"pixels": 3, "values": {"7": 2, "9": 1},
                                                       "files": {"a.png": {"7": 2, "9": 1}}}
    assert clean.check_ground_truth("error", ignore) is None
