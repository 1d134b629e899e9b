"""How hierarchical a set of class prototypes is: cosine similarities ordered by the hierarchy, and
the numbers that summarise them.

For a run's learned prototypes (the memory M^L, M^H of the checkpoint, unit vectors in the projection
space) and for class-mean features of any run (a baseline has no memory), the same numbers:

* parent hit rate: the share of fine classes whose most similar coarse prototype is their parent;
* within-parent similarity: mean cosine over pairs of distinct fine classes with the same parent;
* between-parent similarity: mean cosine over pairs of fine classes with different parents;
* their gap (within - between): > 0 when siblings sit closer together than unrelated classes.

Class-mean features of the decoder are non-negative (they follow a ReLU), so their raw cosines are all
near 1; they are centred on the mean of the fine class means first (`centred`), the same for every
run. A coarse mean averages all pixels of its children, so a fine class's own pixels are part of its
parent's mean: the parent hit rate of class means is an easier test than that of learned prototypes;
compare it between runs, not with the memory's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """The cosine matrices (fine x fine, fine x coarse) of present classes and the summary numbers."""

    fine_cos: np.ndarray  # (K, K), NaN rows/columns for classes without a prototype
    fine_coarse_cos: np.ndarray  # (K, C)
    nearest_coarse: np.ndarray  # (K,) id of the most similar coarse prototype, -1 without one
    parent_hits: int
    parent_counted: int
    within: float | None
    between: float | None

    @property
    def parent_hit_rate(self) -> float | None:
        return self.parent_hits / self.parent_counted if self.parent_counted else None

    @property
    def gap(self) -> float | None:
        return None if self.within is None or self.between is None else self.within - self.between

    def numbers(self) -> dict[str, float | int | None]:
        return {"parent_hit_rate": self.parent_hit_rate, "parent_hits": self.parent_hits,
                "fine_classes_counted": self.parent_counted, "within_parent_cos": self.within,
                "between_parent_cos": self.between, "within_minus_between": self.gap}


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


def centred(fine: np.ndarray, fine_present: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fine and coarse class means minus the mean of the present fine class means."""
    centre = fine[fine_present].mean(axis=0) if fine_present.any() else np.zeros(fine.shape[1])
    return fine - centre, coarse - centre


def cosine(a: np.ndarray, b: np.ndarray, a_present: np.ndarray, b_present: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosine similarity, NaN where either class has no prototype."""
    out = unit_rows(np.asarray(a, np.float64)) @ unit_rows(np.asarray(b, np.float64)).T
    out[~a_present, :] = np.nan
    out[:, ~b_present] = np.nan
    return out


def geometry(fine: np.ndarray, coarse: np.ndarray, fine_present: np.ndarray, coarse_present: np.ndarray,
             fine_to_coarse: np.ndarray) -> Geometry:
    """The numbers of the module docstring for one set of fine and coarse prototypes."""
    pi = np.asarray(fine_to_coarse)
    ff = cosine(fine, fine, fine_present, fine_present)
    fc = cosine(fine, coarse, fine_present, coarse_present)
    nearest = np.full(len(pi), -1)
    counted = fine_present & coarse_present[pi] if coarse_present.any() else np.zeros(len(pi), bool)
    for j in np.nonzero(counted)[0]:
        nearest[j] = int(np.nanargmax(fc[j]))
    hits = int(sum(nearest[j] == pi[j] for j in np.nonzero(counted)[0]))
    i, k = np.triu_indices(len(pi), 1)
    both = fine_present[i] & fine_present[k]
    same = pi[i] == pi[k]
    within = ff[i[both & same], k[both & same]]
    between = ff[i[both & ~same], k[both & ~same]]
    return Geometry(ff, fc, nearest, hits, int(counted.sum()),
                    float(within.mean()) if within.size else None, float(between.mean()) if between.size else None)
