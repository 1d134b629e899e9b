"""The numbers behind `hiposeg plot`'s pictures, against hand-computed cases: log series and phases,
IoU gains and their grouping, the gallery's choice, prototype geometry, the balanced seeded pixel
sampling, neighbour agreement, and the hierarchy-aware palette."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hiposeg.config import build_config
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.plots import curves, embed, geometry, sampling, scores


def toy() -> Hierarchy:
    """a0 a1 a2 (-> A), b0 b1 (-> B), c0 (-> C)."""
    parts = [("a0", "A"), ("a1", "A"), ("a2", "A"), ("b0", "B"), ("b1", "B"), ("c0", "C")]
    return Hierarchy.from_dict({
        "name": "toy", "source": "test",
        "levels": [{"name": "part", "classes": [{"id": i, "name": n, "color": [i, i, i], "parent": p}
                                                for i, (n, p) in enumerate(parts)]},
                   {"name": "object", "classes": [{"id": i, "name": n, "color": [9, i, 9]}
                                                  for i, n in enumerate("ABC")]}],
        "raw": {"ignore": [255]}})


def report(fine: dict, coarse: dict, fine_miou: float, coarse_miou: float) -> dict:
    return {"levels": {"fine": {"level": "part", "mIoU": fine_miou, "IoU": fine, "num_classes": len(fine)},
                       "coarse": {"level": "object", "mIoU": coarse_miou, "IoU": coarse, "num_classes": len(coarse)}}}


# ==========================================================================================
# Training curves
# ==========================================================================================


def test_series_keep_the_later_row_of_an_iteration_logged_twice_and_read_evaluations():
    rows = [{"iter": 10, "lr": 0.02, "loss": 3.0, "ce": 3.0}, {"iter": 20, "lr": 0.01, "loss": 2.0, "ce": 1.5, "fh": 5.0},
            {"iter": 20, "eval": {"fine": 10.0, "coarse": 30.0}},
            {"iter": 20, "lr": 0.01, "loss": 1.0, "ce": 1.0},  # resumed from iteration 10: logged again
            {"iter": 30, "lr": 0.005, "loss": 0.5, "ce": 0.5, "align": True},  # not a number: not a point
            {"iter": 30, "eval": {"fine": 20.0, "coarse": None}}]
    s = curves.training_series(rows)
    assert sorted(s) == ["ce", "fh", "loss", "lr"]
    np.testing.assert_array_equal(s["loss"].iters, [10, 20, 30])
    np.testing.assert_array_equal(s["loss"].values, [3.0, 1.0, 0.5])
    np.testing.assert_array_equal(s["fh"].iters, [20])
    e = curves.eval_series(rows)
    assert list(e) == ["fine", "coarse"]
    np.testing.assert_array_equal(e["fine"].values, [10.0, 20.0])
    np.testing.assert_array_equal(e["coarse"].iters, [20])


@pytest.mark.parametrize("loss, spans", [
    ({}, [(0, 30, "CE"), (30, 90, "+ high"), (90, 150, "+ low"), (150, 400, "+ align")]),
    ({"terms": "ce,fh,hh"}, [(0, 30, "CE"), (30, 400, "+ high")]),
    ({"terms": "ce,fl,ll"}, [(0, 90, "CE"), (90, 400, "+ low")]),
    ({"phases": (0.1, 0.1, 0.5)}, [(0, 40, "CE"), (40, 200, "+ high + low"), (200, 400, "+ align")]),
    ({"phases": (0.0, 0.25, 1.0)}, [(0, 100, "CE + high"), (100, 400, "+ low")]),
    ({"schedule": "joint"}, []),
    ({"terms": "ce"}, []),
])
def test_phase_spans_follow_the_schedule_of_the_configured_terms(loss, spans):
    cfg = build_config({"optim": {"iters": 400}, "loss": loss})
    assert curves.phase_spans(cfg) == spans


# ==========================================================================================
# Scores
# ==========================================================================================


def test_class_rows_gains_and_grouping_by_gain():
    h = toy()
    run = report({"a0": 50.0, "a1": 40.0, "a2": None, "b0": 90.0, "b1": 70.0, "c0": 10.0},
                 {"A": 60.0, "B": 80.0, "C": 10.0}, 43.0, 50.0)
    base = report({"a0": 45.0, "a1": 45.0, "a2": 30.0, "b0": 60.0, "b1": 70.0, "c0": 20.0},
                  {"A": 55.0, "B": 70.0, "C": 20.0}, 45.0, 48.3)
    rows = scores.class_rows(h, "part", run, base)
    assert [(r.name, r.group, r.gain) for r in rows] == [
        ("a0", "A", 5.0), ("a1", "A", -5.0), ("a2", "A", None), ("b0", "B", 30.0), ("b1", "B", 0.0), ("c0", "C", -10.0)]
    groups = scores.grouped_by_gain(rows)
    # B: mean gain 15, A: mean 0 (a2 has none), C: -10; inside A: a0 (+5), a1 (-5), a2 (none) last
    assert [(g, [r.name for r in m]) for g, m in groups] == [("B", ["b0", "b1"]), ("A", ["a0", "a1", "a2"]),
                                                              ("C", ["c0"])]
    coarse = scores.class_rows(h, "object", run, base)
    assert [(r.name, r.group, r.gain) for r in coarse] == [("A", None, 5.0), ("B", None, 10.0), ("C", None, -10.0)]
    alone = scores.grouped_by_gain(scores.class_rows(h, "part", run, None))  # no baseline: by IoU
    assert [g for g, _ in alone] == ["B", "A", "C"] and [r.name for r in alone[1][1]] == ["a0", "a1", "a2"]


def test_level_table_gives_each_level_and_its_gap_to_fine():
    t = scores.level_table({"base": report({}, {}, 40.0, 55.0), "run": report({}, {}, 45.0, None)})
    assert t == {"base": {"fine": 40.0, "coarse": 55.0, "gap coarse - fine": 15.0},
                 "run": {"fine": 45.0, "coarse": None, "gap coarse - fine": None}}


def test_hierarchy_order_and_blocks_row_normalisation_and_confusion_checks():
    h = toy()
    assert scores.hierarchy_order(h, "part") == ([0, 1, 2, 3, 4, 5], [("A", 0, 3), ("B", 3, 5), ("C", 5, 6)])
    assert scores.hierarchy_order(h, "object") == ([0, 1, 2], [])
    np.testing.assert_allclose(scores.row_normalised(np.array([[3, 1, 0], [0, 0, 0]])), [[0.75, 0.25, 0], [0, 0, 0]])
    rep = {"levels": {"fine": {"num_classes": 2, "confusion": [[1, 0], [0, 1]]}}}
    with pytest.raises(UserError, match=r"fine confusion matrix is 2x2, expected 2x3"):
        scores.confusion_of(rep, "fine")
    assert scores.confusion_of({"levels": {"fine": {"num_classes": 2}}}, "fine") is None


def test_gallery_takes_the_largest_improvements_and_regressions_ties_to_the_earlier_image():
    stems = ["s0", "s1", "s2", "s3", "s4", "s5"]
    run = np.array([80.0, 70.0, 90.0, 50.0, 60.0, 65.0])
    base = np.array([70.0, 60.0, 95.0, 70.0, 60.0, 55.0])  # gains +10 +10 -5 -20 0 +10
    assert scores.choose_gallery(stems, run, base, 2, []) == [
        ("s0", "largest improvement"), ("s1", "largest improvement"),
        ("s3", "largest regression"), ("s2", "largest regression")]
    same = scores.choose_gallery(stems, run, run.copy(), 1, [])  # no image differs: the run's worst and best
    assert same == [("s3", "worst"), ("s2", "best")]
    assert scores.choose_gallery(stems, run, None, 1, []) == [("s3", "worst"), ("s2", "best")]
    assert scores.choose_gallery(stems, run, base, 2, ["s4"]) == [("s4", "named")]
    with pytest.raises(UserError, match="--show nope: no such image among the 6 plotted images"):
        scores.choose_gallery(stems, run, base, 2, ["nope"])


def test_ablation_rows_from_results_and_from_runs():
    results = {"configs": [{"config": "losses=ce", "fine": {"mean": 40.0, "std": 1.0, "n": 2},
                            "coarse": {"mean": 50.0, "std": None, "n": 1}, "paper": {"table": "Table 5", "fine_mIoU": 73.55}},
                           {"config": "all", "fine": {"mean": None, "std": None, "n": 0},
                            "coarse": {"mean": None, "std": None, "n": 0}, "paper": None}]}
    rows = scores.ablation_rows(results)
    assert rows[0] == {"config": "losses=ce", "fine": {"mean": 40.0, "std": 1.0, "n": 2},
                       "coarse": {"mean": 50.0, "std": None, "n": 1}, "paper": 73.55}
    assert rows[1]["paper"] is None and rows[1]["fine"]["n"] == 0
    with pytest.raises(UserError, match="lacks the fields fine/coarse"):
        scores.ablation_rows({"configs": [{"config": "x"}]})
    from_runs = scores.runs_as_ablation({"ce": report({}, {}, 40.0, 50.0)}, {"ce": None})
    assert from_runs == [{"config": "ce", "fine": {"mean": 40.0, "std": None, "n": 1},
                          "coarse": {"mean": 50.0, "std": None, "n": 1}, "paper": None}]


# ==========================================================================================
# Prototype geometry
# ==========================================================================================


def test_geometry_numbers_against_hand_computed_prototypes():
    """Fine prototypes in 2-D: a0 (1, 0), a1 (0.6, 0.8), a2 absent; b0 (-1, 0), b1 (0, -1); c0 (0.8, -0.6).
    Coarse: A (1, 0), B (-0.6, -0.8), C (0, -1)."""
    h = toy()
    fine = np.array([[1, 0], [0.6, 0.8], [0, 0], [-1, 0], [0, -1], [0.8, -0.6]], float)
    present = np.array([True, True, False, True, True, True])
    coarse = np.array([[1, 0], [-0.6, -0.8], [0, -1]], float)
    g = geometry.geometry(fine, coarse, present, np.ones(3, bool), h.fine_to_coarse)
    # nearest coarse: a0 -> A (1), a1 -> A (0.6 vs -0.84, -0.8), b0 -> B (0.6 vs -1, 0), b1 -> C (1 vs 0.8): a miss,
    # c0 -> A (0.8 vs 0.6 for C, 0.0 for B): a miss
    np.testing.assert_array_equal(g.nearest_coarse, [0, 0, -1, 1, 2, 0])
    assert (g.parent_hits, g.parent_counted, g.parent_hit_rate) == (3, 5, 0.6)
    # within: (a0, a1) = 0.6, (b0, b1) = 0 -> 0.3; between: a0b0 -1, a0b1 0, a0c0 .8, a1b0 -.6, a1b1 -.8, a1c0 0,
    # b0c0 -.8, b1c0 .6 -> -1.8 / 8
    assert g.within == pytest.approx(0.3)
    assert g.between == pytest.approx(-0.225)
    assert g.gap == pytest.approx(0.525)
    assert np.isnan(g.fine_cos[2]).all() and np.isnan(g.fine_cos[:, 2]).all()
    assert g.numbers()["within_minus_between"] == pytest.approx(0.525)


def test_geometry_of_a_perfectly_hierarchical_space_and_of_prototypes_never_seen():
    h = toy()
    parents = np.eye(3)
    fine = parents[h.fine_to_coarse] + 0.1 * np.arange(6)[:, None] * np.array([0, 0, 0.01])
    g = geometry.geometry(fine, parents, np.ones(6, bool), np.ones(3, bool), h.fine_to_coarse)
    assert g.parent_hits == g.parent_counted == 6
    assert g.within > 0.99 and g.between < 0.05
    none = geometry.geometry(np.zeros((6, 3)), np.zeros((3, 3)), np.zeros(6, bool), np.zeros(3, bool), h.fine_to_coarse)
    assert (none.parent_counted, none.parent_hit_rate, none.within, none.between, none.gap) == (0, None, None, None, None)


def test_class_means_average_pixels_and_coarse_means_pool_the_children():
    h = toy()
    sums = np.array([[2.0, 0], [0, 3.0], [0, 0], [4.0, 4.0], [0, 0], [1, 1]])
    counts = np.array([2, 1, 0, 4, 0, 1])
    fine, fine_ok, coarse, coarse_ok = sampling.class_means(sums, counts, h.fine_to_coarse, 3)
    np.testing.assert_allclose(fine[:2], [[1, 0], [0, 3]])
    np.testing.assert_array_equal(fine_ok, [True, True, False, True, False, True])
    np.testing.assert_allclose(coarse, [[2 / 3, 1.0], [1, 1], [1, 1]])  # A: (2 + 0, 0 + 3) / 3 pixels
    f, c = geometry.centred(fine, fine_ok, coarse)
    np.testing.assert_allclose(f[fine_ok].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(coarse - c, np.broadcast_to(fine[fine_ok].mean(axis=0), coarse.shape))


# ==========================================================================================
# The pass over the split: balanced, seeded, order-free sampling; per-image accuracy
# ==========================================================================================


class LabelEcho(nn.Module):
    """A fake segmenter whose stride-4 'decoder' feature at (y, x) is (y, x, label-ish) and whose
    logits predict class 0 everywhere except where the image's red channel is 255."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, H, W = x.shape
        ys, xs = torch.meshgrid(torch.arange(H // 4), torch.arange(W // 4), indexing="ij")
        decoder = torch.stack([ys.float(), xs.float(), x[0, 1, 2::4, 2::4] + self.offset])[None]
        logits = torch.zeros(b, 6, H, W)
        logits[:, 0] = 1.0
        logits[:, 3] = (x[:, 0] > 2).float() * 2
        return {"logits": logits, "decoder": decoder}


class Split:
    """A stand-in for a prepared split: images carry the label in the green channel."""

    def __init__(self, labels: list[np.ndarray]) -> None:
        self.labels = labels
        self.stems = [f"img{i}" for i in range(len(labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        fine = torch.from_numpy(self.labels[i]).long()
        image = torch.zeros(3, *fine.shape, dtype=torch.uint8)
        image[1] = fine.clamp(max=254).to(torch.uint8)
        image[0, :4] = 255
        return {"image": image, "fine": fine, "stem": self.stems[i]}


def split_of(seed: int = 0, n: int = 5) -> Split:
    rng = np.random.default_rng(seed)
    labels = []
    for _ in range(n):
        lab = rng.choice([0, 0, 0, 1, 3, 5], size=(32, 32))  # class 2 and 4 never occur; 0 is common
        lab[:4, :8] = 255
        labels.append(lab)
    return Split(labels)


def run_pass(split: Split, positions: list[int], per_class: int, seed: int) -> sampling.Samples:
    unscaled = (1 / 255, 1 / 255, 1 / 255)  # normalise() then gives back the stored values
    models = [sampling.Model("m", LabelEcho(0.0), (0, 0, 0), unscaled),
              sampling.Model("n", LabelEcho(100.0), (0, 0, 0), unscaled)]
    return sampling.sample_split(models, split, toy(), positions, per_class, seed, torch.device("cpu"))


def test_sampling_is_balanced_seeded_order_free_and_matches_a_brute_force_bottom_k():
    split = split_of()
    s = run_pass(split, list(range(5)), 20, seed=7)
    # labels at the centres of the 8x8 grid: pixels (4i + 2, 4j + 2)
    small = [lab[2::4, 2::4] for lab in split.labels]
    counts = np.bincount(np.concatenate([m[m < 6] for m in small]), minlength=6)
    np.testing.assert_array_equal(s.class_counts, counts)
    assert counts[0] > 20 and 0 < counts[1]
    np.testing.assert_array_equal(np.bincount(s.labels, minlength=6), np.minimum(counts, 20))  # balanced
    for (img, y, x), lab, f, g in zip(s.where, s.labels, s.features["m"], s.features["n"]):
        assert small[img][y, x] == lab  # the sampled pixel holds its label
        np.testing.assert_array_equal(f, [y, x, lab])  # and its feature, the same pixel in every model
        np.testing.assert_array_equal(g, [y, x, lab + 100])
    # brute force: per class, the 20 pixels of smallest key over the whole split
    expect = set()
    for c in range(6):
        cands = [(sampling.pixel_keys(7, i, (8, 8))[y, x], i, y, x) for i, m in enumerate(small)
                 for y, x in zip(*np.nonzero(m == c))]
        expect |= {(i, y, x) for _, i, y, x in sorted(cands)[:20]}
    assert {tuple(w) for w in s.where.tolist()} == expect
    again = run_pass(split, [4, 3, 2, 1, 0], 20, seed=7)  # other visiting order: the same pixels
    assert {tuple(w) for w in again.where.tolist()} == expect
    other = run_pass(split, list(range(5)), 20, seed=8)
    assert {tuple(w) for w in other.where.tolist()} != expect


def test_the_pass_counts_per_image_accuracy_and_sums_class_features():
    split = split_of(n=2)
    s = run_pass(split, [0, 1], 5, seed=0)
    for i, lab in enumerate(split.labels):
        pred = np.zeros_like(lab)
        pred[:4] = 3  # red rows: class 3
        valid = lab != 255
        assert s.accuracy["m"]["fine"][i] == pytest.approx((pred == lab)[valid].mean() * 100)
        pi = toy().fine_to_coarse
        assert s.accuracy["m"]["coarse"][i] == pytest.approx((pi[pred] == pi[np.minimum(lab, 5)])[valid].mean() * 100)
    small = np.concatenate([lab[2::4, 2::4].ravel() for lab in split.labels])
    np.testing.assert_allclose(s.class_sums["m"][:, 2], [np.sum(small == c) * c for c in range(6)])
    assert s.stems == ["img0", "img1"]


def test_evenly_spaced_positions_and_labels_at_feature_centres():
    assert sampling.evenly_spaced(5, 10) == [0, 1, 2, 3, 4]
    assert sampling.evenly_spaced(100, 4) == [0, 33, 66, 99]
    lab = torch.arange(64).reshape(8, 8)
    np.testing.assert_array_equal(sampling.labels_at(lab, (2, 2)).numpy(), lab[2::4, 2::4].numpy())


# ==========================================================================================
# Neighbour agreement and the embedding
# ==========================================================================================


def test_neighbour_agreement_counts_shared_classes_and_parents():
    h = toy()
    # two tight clusters: {a0 x3, a1 x1} near 0 and {b0 x2, c0 x2} near 10
    feats = np.array([[0.0], [0.1], [0.2], [0.3], [10.0], [10.1], [10.2], [10.3]])
    fine = np.array([0, 0, 0, 1, 3, 3, 5, 5])
    a = embed.neighbour_agreement(feats, fine, h.fine_to_coarse, k=3)
    # a0s: 2 of 3 neighbours a0; a1: 0 of 3; b0s: 1 of 3 each; c0s: 1 of 3 each -> fine (2*3 + 0 + 1*4) / 24
    assert a["fine"] == pytest.approx(10 / 24)
    # coarse: the first cluster is all A (24/24 there: 12), the second mixes B and C (1 of 3 each: 4)
    assert a["coarse"] == pytest.approx((12 + 4) / 24)
    assert a["k"] == 3


def test_drop_self_removes_the_point_even_when_a_duplicate_comes_first():
    idx = np.array([[0, 1, 2], [0, 1, 2], [1, 2, 0]])  # row 1: its duplicate 0 listed before it
    np.testing.assert_array_equal(embed.drop_self(idx), [[1, 2], [0, 2], [1, 0]])
    no_self = np.array([[1, 2, 3]])  # point 0 pushed off the list by ties: the last neighbour goes
    np.testing.assert_array_equal(embed.drop_self(no_self), [[1, 2]])


def test_embedding_is_deterministic_and_umap_without_its_package_says_how_to_install(monkeypatch):
    pytest.importorskip("sklearn")
    x = np.random.default_rng(0).normal(size=(60, 8))
    a, b = embed.embed(x, "tsne", 3), embed.embed(x, "tsne", 3)
    assert a.shape == (60, 2)
    np.testing.assert_array_equal(a, b)
    assert embed.embed(x, "pca", 0).shape == (60, 2)
    monkeypatch.setitem(__import__("sys").modules, "umap", None)
    with pytest.raises(UserError, match="--embedding umap needs umap-learn, which is not installed: pip install umap-learn"):
        embed.embed(x, "umap", 0)
    with pytest.raises(UserError, match="at least 3 sampled pixels"):
        embed.embed(x[:2], "tsne", 0)
