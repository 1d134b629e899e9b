"""How long does the feature map of `hiposeg plot` take at a realistic size?

Cityscapes' hierarchy (19 fine classes under 7 categories), `--pixels-per-class` pixels of each
class as 256-d decoder features (clustered: a centre per category, one per class near it, noise),
then the steps the feature-map picture takes, each timed: the 2-D embedding (t-SNE, the paper's;
PCA), the neighbour agreement in the full feature space, and drawing + saving the PNG.

    python benchmarks/bench_plots.py                                 # 19 classes x 1,000 pixels
    python benchmarks/bench_plots.py --pixels-per-class 200 --methods tsne
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hiposeg.hierarchy import Hierarchy
from hiposeg.palette import level_palette
from hiposeg.plots import require_plotting
from hiposeg.plots.embed import embed, neighbour_agreement
from hiposeg.plots.scores import hierarchy_order

DIMS = 256


def clustered_features(fine_to_coarse: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 256) features and their fine labels: category centres, class centres near them, noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 3.0, (fine_to_coarse.max() + 1, DIMS))
    fine = coarse[fine_to_coarse] + rng.normal(0, 1.5, (len(fine_to_coarse), DIMS))
    labels = np.repeat(np.arange(len(fine_to_coarse)), per_class)
    return (fine[labels] + rng.normal(0, 1.0, (len(labels), DIMS))).astype(np.float32), labels


def timed(make):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    result = make()
    return result, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixels-per-class", type=int, default=1000)
    parser.add_argument("--methods", default="tsne,pca", help="Comma-separated: tsne, pca, umap.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require_plotting()
    from hiposeg.plots.draw import save
    from hiposeg.plots.draw.featuremap import draw_feature_map

    h = Hierarchy.load("cityscapes")
    pi = np.asarray(h.fine_to_coarse)
    feats, labels = clustered_features(pi, args.pixels_per_class, args.seed)
    print(f"{h.num_fine} classes x {args.pixels_per_class} pixels = {len(labels):,} points, {DIMS}-d")
    agreement, seconds = timed(lambda: neighbour_agreement(feats, labels, pi))
    print(f"| neighbour agreement (k={agreement['k']}) | {seconds:.1f} s |")
    order, blocks = hierarchy_order(h, h.fine_level)
    groups = [(name, order[a:b]) for name, a, b in blocks]
    for method in args.methods.split(","):
        xy, seconds = timed(lambda m=method: embed(feats, m, args.seed))
        print(f"| embedding: {method} | {seconds:.1f} s |")
        with tempfile.TemporaryDirectory() as tmp:
            _, seconds = timed(lambda: save(draw_feature_map(
                {"run": xy}, labels, {"run": method}, h.names(h.fine_level),
                level_palette(h, h.fine_level, "families"), groups, method), Path(tmp), "featuremap"))
        print(f"| draw + save ({method}) | {seconds:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
