"""2-D maps of sampled pixel features (t-SNE as in the paper's Fig. 4; PCA; UMAP with umap-learn),
and a number that does not depend on the map: how often a pixel's nearest neighbours in the full
feature space share its fine class, and its coarse parent."""

from __future__ import annotations

import numpy as np

from hiposeg.errors import UserError

EMBEDDINGS = ("tsne", "pca", "umap")
PCA_DIMS = 50  # t-SNE and UMAP read the first 50 principal components (the usual preprocessing)
NEIGHBOURS = 10


def embed(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(N, 2) coordinates of the (N, d) features, deterministic for a seed."""
    from sklearn.decomposition import PCA

    if method not in EMBEDDINGS:
        raise UserError(f"--embedding {method!r} is not one of {', '.join(EMBEDDINGS)}")
    x = np.asarray(features, np.float32)
    n = len(x)
    if n < 3:
        raise UserError(f"the feature map needs at least 3 sampled pixels, the split gave {n}",
                        hint="Raise --pixels-per-class or --images.")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if x.shape[1] > PCA_DIMS and n > PCA_DIMS:
        x = PCA(n_components=PCA_DIMS, random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("--embedding umap needs umap-learn, which is not installed: pip install umap-learn",
                            hint="Or use --embedding tsne (the paper's) or pca.") from None
        return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(x)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=min(30.0, (n - 1) / 3),
                random_state=seed).fit_transform(x)


def neighbour_agreement(features: np.ndarray, fine: np.ndarray, fine_to_coarse: np.ndarray,
                        k: int = NEIGHBOURS) -> dict[str, float]:
    """Mean share of each pixel's k nearest other pixels (Euclidean, in the full feature space) that
    hold its fine class, and that hold a class of its coarse parent."""
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    k = min(k, n - 1)
    if k < 1:
        return {"fine": float("nan"), "coarse": float("nan"), "k": 0}
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    idx = drop_self(idx)[:, :k]
    pi = np.asarray(fine_to_coarse)
    same_fine = fine[idx] == fine[:, None]
    same_coarse = pi[fine[idx]] == pi[fine][:, None]
    return {"fine": float(same_fine.mean()), "coarse": float(same_coarse.mean()), "k": k}


def drop_self(idx: np.ndarray) -> np.ndarray:
    """Each row of a self-inclusive k+1 neighbour list without the point itself (which duplicate points
    may push off the first column)."""
    rows = np.arange(len(idx))[:, None]
    not_self = idx != rows
    # every row keeps k entries: the point itself if present is removed, else the last neighbour
    keep = np.where(not_self.all(axis=1, keepdims=True), np.arange(idx.shape[1]) < idx.shape[1] - 1, not_self)
    return idx[keep].reshape(len(idx), idx.shape[1] - 1)
