"""One pass over (a bounded, evenly spaced part of) the validation split with every compared model:
the pixels the feature map shows, the class-mean features of the prototype geometry, and the per-image
accuracy the gallery chooses by.

Pixels are sampled at the resolution of the stride-4 decoder feature (`forward_features(x)["decoder"]`,
which every model family provides, so a baseline and a HiPoSeg run are compared on the same feature),
with labels taken at the feature pixels' centres (`nearest-exact`, as training does). Sampling is
balanced and seeded: every feature pixel gets a key drawn from a generator seeded by (seed, image
position in the split), and each class keeps its `per_class` pixels of smallest key, which is a
uniform sample without replacement of that class's pixels (min(per_class, pixels of the class)
each), the same whatever the order the images are visited in, and the same pixels for every model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy


@dataclass
class Model:
    """A segmenter to score and sample, with the normalisation it was trained with."""

    label: str
    segmenter: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> float (1, 3, H, W), as evaluation feeds it."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((image.float() / 255.0 - mean) / std)[None]


@dataclass
class Samples:
    """The result of the pass. Sampled pixels are rows: `labels` (fine ids), `where` (image position in
    `stems`, y, x at feature resolution), `features[model label]`. Class-mean inputs are sums and
    counts over every labelled feature pixel of the visited images."""

    stems: list[str]
    labels: np.ndarray
    where: np.ndarray
    features: dict[str, np.ndarray]
    class_sums: dict[str, np.ndarray]
    class_counts: np.ndarray
    accuracy: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # model -> level -> (images,)


def evenly_spaced(total: int, limit: int) -> list[int]:
    """At most `limit` positions of 0..total-1, spread evenly over the range (all of them if it fits)."""
    if limit >= total:
        return list(range(total))
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, limit)})


def labels_at(fine: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) integer labels at the centres of an (h, w) grid (`nearest-exact`, exact for ids < 2**24)."""
    return F.interpolate(fine[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def pixel_keys(seed: int, position: int, shape: tuple[int, int]) -> np.ndarray:
    """The sampling keys of one image's feature pixels: uniform in [0, 1), fixed by (seed, position)."""
    return np.random.default_rng([seed, position]).random(shape)


class BottomK:
    """Per class, the `k` entries of smallest key seen so far (entries are rows of several arrays)."""

    def __init__(self, num_classes: int, k: int) -> None:
        self.k = k
        self.keys: list[np.ndarray] = [np.empty(0) for _ in range(num_classes)]
        self.rows: list[dict[str, np.ndarray]] = [{} for _ in range(num_classes)]

    def offer(self, cls: int, keys: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Candidates of class `cls`; keeps the k smallest keys (ties: the earlier offered)."""
        keys = np.concatenate([self.keys[cls], keys])
        merged = {name: np.concatenate([self.rows[cls][name], rows[name]]) if self.rows[cls] else rows[name]
                  for name in rows}
        keep = np.argsort(keys, kind="stable")[: self.k]
        self.keys[cls] = keys[keep]
        self.rows[cls] = {name: v[keep] for name, v in merged.items()}

    def threshold(self, cls: int) -> float:
        """Keys at or above this cannot enter class `cls` any more."""
        return float(self.keys[cls][-1]) if len(self.keys[cls]) >= self.k else np.inf

    def gather(self, name: str, empty: np.ndarray) -> np.ndarray:
        """Column `name` of every kept entry, classes in id order (each class's entries by key)."""
        parts = [r[name] for r in self.rows if r]
        return np.concatenate(parts) if parts else empty


@torch.no_grad()
def sample_split(models: list[Model], dataset, h: Hierarchy, positions: list[int], per_class: int, seed: int,
                 device: torch.device) -> Samples:
    """The pass of the module docstring over `dataset` (a `PreparedDataset` without transforms, fine
    labels) at `positions`, with every model in `models`."""
    k = h.num_fine
    pi = torch.as_tensor(h.fine_to_coarse)
    chosen = BottomK(k, per_class)
    sums = {m.label: np.zeros((k, 0)) for m in models}
    counts = np.zeros(k, dtype=np.int64)
    accuracy = {m.label: {"fine": [], "coarse": []} for m in models}
    for m in models:
        m.segmenter.eval().to(device)
    for position in positions:
        item = dataset[position]
        fine = item["fine"]
        decoders = {}
        for m in models:
            out = m.segmenter.forward_features(m.normalise(item["image"]).to(device))
            decoders[m.label] = out["decoder"][0].float().cpu()
            pred = out["logits"][0].argmax(0).cpu()
            for level, acc in zip(("fine", "coarse"), image_accuracy(pred, fine, pi, h.ignore_index)):
                accuracy[m.label][level].append(acc)
        size = check_feature_sizes(decoders, item["stem"])
        small = labels_at(fine, size)
        valid = (small >= 0) & (small < k)
        counts += np.bincount(small[valid].numpy(), minlength=k)
        for label, dec in decoders.items():
            flat = dec.permute(1, 2, 0)[valid].double().numpy()
            part = np.zeros((k, flat.shape[1]))
            np.add.at(part, small[valid].numpy(), flat)
            sums[label] = part if sums[label].shape[1] == 0 else sums[label] + part
        offer_pixels(chosen, small, valid, pixel_keys(seed, position, size), position, decoders)
    empty = np.empty((0,), np.int64)
    features = {m.label: chosen.gather(m.label, np.empty((0, 0), np.float32)) for m in models}
    where = np.stack([chosen.gather(n, empty) for n in ("image", "y", "x")], axis=1) if per_class else empty
    return Samples([dataset.stems[p] for p in positions], chosen.gather("label", empty), where.reshape(-1, 3),
                   features, sums, counts,
                   {lab: {lv: np.array(v, dtype=np.float64) for lv, v in acc.items()} for lab, acc in accuracy.items()})


def offer_pixels(chosen: BottomK, small: torch.Tensor, valid: torch.Tensor, keys: np.ndarray, position: int,
                 decoders: dict[str, torch.Tensor]) -> None:
    """Offer each class's pixels of this image whose keys could still enter its sample."""
    labels = small.numpy()
    for cls in np.unique(labels[valid.numpy()]):
        ys, xs = np.nonzero((labels == cls) & valid.numpy())
        key = keys[ys, xs]
        low = key < chosen.threshold(int(cls))
        if not low.any():
            continue
        ys, xs = ys[low], xs[low]
        rows = {"label": np.full(len(ys), cls, np.int64), "image": np.full(len(ys), position, np.int64),
                "y": ys.astype(np.int64), "x": xs.astype(np.int64)}
        rows.update({lab: dec[:, ys, xs].T.numpy().astype(np.float32) for lab, dec in decoders.items()})
        chosen.offer(int(cls), key[low], rows)


def image_accuracy(pred: torch.Tensor, fine: torch.Tensor, pi: torch.Tensor, ignore: int) -> tuple[float, float]:
    """Fine and coarse pixel accuracy (%) of one prediction over the labelled pixels (NaN: none)."""
    valid = (fine != ignore) & (fine >= 0) & (fine < len(pi))
    if not bool(valid.any()):
        return float("nan"), float("nan")
    p, g = pred[valid], fine[valid]
    return float((p == g).double().mean() * 100), float((pi[p] == pi[g]).double().mean() * 100)


def check_feature_sizes(decoders: dict[str, torch.Tensor], stem: str) -> tuple[int, int]:
    """Every model's decoder feature must cover the same grid, or their pixels are not the same pixels."""
    sizes = {label: tuple(d.shape[-2:]) for label, d in decoders.items()}
    if len(set(sizes.values())) > 1:
        raise UserError(f"the compared models' decoder features differ in size on image {stem} ({sizes}): their "
                        "feature pixels cannot be matched", hint="Compare runs of model families with the same "
                                                                  "stride-4 decoder feature.")
    return next(iter(sizes.values()))  # type: ignore[return-value]


def class_means(sums: np.ndarray, counts: np.ndarray, pi: np.ndarray, num_coarse: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fine means, fine present, coarse means, coarse present): means of the features of each class,
    the coarse ones over all pixels of their children (eq. 5 at both levels, as the prototypes are)."""
    fine_present = counts > 0
    fine = sums / np.maximum(counts, 1)[:, None]
    coarse_sums = np.zeros((num_coarse, sums.shape[1]))
    np.add.at(coarse_sums, pi, sums)
    coarse_counts = np.bincount(pi, weights=counts, minlength=num_coarse)
    return fine, fine_present, coarse_sums / np.maximum(coarse_counts, 1)[:, None], coarse_counts > 0


def prepared_split(root: Path, split: str):  # type: ignore[no-untyped-def]
    """The split as uint8 images and fine labels (no transforms): what the pass and the gallery read."""
    from hiposeg.data.dataset import PreparedDataset

    return PreparedDataset(Path(root), split, transforms=None, levels=("fine",))
