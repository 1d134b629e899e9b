"""The vectorised HiPoSeg branch against a float64 reference written straight from the paper's formulas.

The reference below loops over pixels, classes and pairs and follows Sec. 3 (eqs. 2, 5-15) plus the
decisions (hiposeg/prototypes.py docstring) that the paper leaves open (which prototypes a loss sees, first sighting,
never-seen classes, centred nearest label sampling). It shares no code with hiposeg.prototypes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hiposeg.config import LossConfig
from hiposeg.prototypes import HiPoSegCriterion

IGNORE = 255
# 9 fine classes under 4 coarse ones; coarse 3 has a single child (so l == h there: delta = 0 in eq. 11)
FINE_TO_COARSE = [0, 0, 1, 1, 1, 2, 2, 3, 0]
EPS = 1e-6  # the epsilon of eq. 5


def cfg(**kw) -> LossConfig:
    base = dict(schedule="joint", tau=0.5, kappa=0.7, lambda_ce=0.3, lambda_fh=0.2, lambda_hh=0.4, lambda_fl=0.6,
                lambda_ll=0.5, lambda_align=0.8, alpha=0.7, beta=1.3, sigma1=0.3, sigma2=1.6, memory_momentum=0.8)
    base.update(kw)
    return LossConfig(**base)


# ------------------------------- the reference, one formula at a time -------------------------------


def norm(v: torch.Tensor) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in v))


def delta(a: torch.Tensor, b: torch.Tensor) -> float:  # Euclidean distance
    return norm(a - b)


def s(a: torch.Tensor, b: torch.Tensor) -> float:  # s(a, b) = -delta(a, b)^2
    return -delta(a, b) ** 2


def ref_labels_at(fine: torch.Tensor, h: int, w: int) -> list[list[list[int]]]:
    """Label of embedding pixel (i, j): the label pixel at the centre of its cell."""
    B, H, W = fine.shape
    return [[[int(fine[b, min(H - 1, math.floor((i + 0.5) * H / h)), min(W - 1, math.floor((j + 0.5) * W / w))])
              for j in range(w)] for i in range(h)] for b in range(B)]


def ref_batch_prototypes(pixels: list[tuple[torch.Tensor, int]], K: int) -> dict[int, torch.Tensor]:
    """Eqs. 5-6: per-class mean of the normalised embeddings, then l2-normalised (classes in the batch)."""
    out = {}
    for c in range(K):
        members = [z for z, y in pixels if y == c]
        if members:
            mu = sum(members) / (len(members) + EPS)  # eq. 5
            out[c] = mu / norm(mu)  # eq. 6
    return out


def ref_loss_prototypes(memory: dict[int, torch.Tensor], batch: dict[int, torch.Tensor], m: float) -> dict[int, torch.Tensor]:
    """The decided rule: blend (eq. 15, renormalised) if seen before and in the batch, batch estimate on first
    sighting, memory if absent, nothing for never-seen classes."""
    out = {}
    for c in set(memory) | set(batch):
        if c in batch and c in memory:
            v = m * memory[c] + (1 - m) * batch[c]  # eq. 15
            out[c] = v / norm(v)
        elif c in batch:
            out[c] = batch[c]
        else:
            out[c] = memory[c]
    return out


def ref_feature_prototype(pixels: list[tuple[torch.Tensor, int]], P: dict[int, torch.Tensor], tau: float) -> float:
    """Eqs. 7 / 9."""
    total = 0.0
    for z, y in pixels:
        num = math.exp(s(z, P[y]) / tau)
        den = sum(math.exp(s(z, P[c]) / tau) for c in P)
        total += -math.log(num / den)
    return total / len(pixels)


def ref_repulsion(P: dict[int, torch.Tensor], kappa: float) -> float:
    """Eqs. 8 / 10."""
    n = len(P)
    if n < 2:
        return 0.0
    return sum(math.exp(s(P[i], P[k]) / kappa) for i in P for k in P if i != k) / (n * (n - 1))


def ref_align_in(L: dict[int, torch.Tensor], H: dict[int, torch.Tensor], sigma1: float) -> float:
    """Eq. 11 over the fine classes j (with a prototype) whose parent pi(j) has one."""
    pairs = [(FINE_TO_COARSE[j], j) for j in L if FINE_TO_COARSE[j] in H]
    if not pairs:
        return 0.0
    return sum(max(0.0, delta(L[j], H[i]) - sigma1) for i, j in pairs) / len(pairs)


def ref_align_out(H: dict[int, torch.Tensor], sigma2: float) -> float:
    """Eq. 12."""
    n = len(H)
    if n < 2:
        return 0.0
    return sum(max(0.0, sigma2 - delta(H[i], H[k])) for i in H for k in H if i != k) / (n * (n - 1))


def ref_cross_entropy(logits: torch.Tensor, fine: torch.Tensor) -> float:
    total, n = 0.0, 0
    B, K, Hh, Ww = logits.shape
    for b in range(B):
        for i in range(Hh):
            for j in range(Ww):
                y = int(fine[b, i, j])
                if y == IGNORE:
                    continue
                lse = math.log(sum(math.exp(float(logits[b, c, i, j])) for c in range(K)))
                total += lse - float(logits[b, y, i, j])
                n += 1
    return total / n


class Reference:
    """State (the two memories) plus one training step."""

    def __init__(self, c: LossConfig) -> None:
        self.c = c
        self.mem_h: dict[int, torch.Tensor] = {}
        self.mem_l: dict[int, torch.Tensor] = {}

    def step(self, logits: torch.Tensor, emb: torch.Tensor, fine: torch.Tensor) -> dict[str, float]:
        c = self.c
        B, d, h, w = emb.shape
        lab = ref_labels_at(fine, h, w)
        low = [(emb[b, :, i, j], lab[b][i][j]) for b in range(B) for i in range(h) for j in range(w)
               if lab[b][i][j] != IGNORE]
        high = [(z, FINE_TO_COARSE[y]) for z, y in low]  # eq. 2
        H = ref_loss_prototypes(self.mem_h, ref_batch_prototypes(high, max(FINE_TO_COARSE) + 1), c.memory_momentum)
        L = ref_loss_prototypes(self.mem_l, ref_batch_prototypes(low, len(FINE_TO_COARSE)), c.memory_momentum)
        t = {
            "ce": ref_cross_entropy(logits, fine),
            "fh": ref_feature_prototype(high, H, c.tau),
            "hh": ref_repulsion(H, c.kappa),
            "fl": ref_feature_prototype(low, L, c.tau),
            "ll": ref_repulsion(L, c.kappa),
            "align_in": ref_align_in(L, H, c.sigma1),
            "align_out": ref_align_out(H, c.sigma2),
        }
        t["align"] = c.alpha * t["align_in"] + c.beta * t["align_out"]  # eq. 13
        t["total"] = (c.lambda_ce * t["ce"] + c.lambda_fh * t["fh"] + c.lambda_hh * t["hh"] + c.lambda_fl * t["fl"]
                      + c.lambda_ll * t["ll"] + c.lambda_align * t["align"])  # eq. 14
        self.mem_h, self.mem_l = H, L  # eq. 15: the memory takes the (blended) prototypes
        return t


# ------------------------------------------ the data ------------------------------------------

# Fine classes present in each step: class 7 (sole child of coarse 3) appears from step 1 on; class 4
# disappears after step 0; class 6 first appears in step 2; step 3 drops coarse 2 entirely.
STEP_CLASSES = [[0, 1, 2, 3, 4, 5, 8], [0, 2, 3, 5, 7], [1, 2, 6, 7, 8, 0], [0, 1, 2, 7]]


def make_batch(step: int, gen: torch.Generator, B: int = 2, d: int = 8, h: int = 5, w: int = 6, up: int = 2):
    classes = torch.tensor(STEP_CLASSES[step])
    fine = classes[torch.randint(len(classes), (B, h * up, w * up), generator=gen)]
    fine[torch.rand(fine.shape, generator=gen) < 0.15] = IGNORE
    emb = F.normalize(torch.randn(B, d, h, w, generator=gen, dtype=torch.float64), dim=1)
    logits = torch.randn(B, len(FINE_TO_COARSE), h * up, w * up, generator=gen, dtype=torch.float64)
    return logits, emb, fine


def rel_err(a: float, b: float) -> float:
    assert b != 0.0, "reference value is 0: the comparison would be meaningless"
    return abs(a - b) / abs(b)


# ------------------------------------------ the tests ------------------------------------------


@pytest.mark.parametrize("momentum", [0.8, 0.9])
def test_every_term_and_the_memory_match_the_float64_reference(momentum):
    c = cfg(memory_momentum=momentum)
    crit = HiPoSegCriterion(c, torch.tensor(FINE_TO_COARSE), embed_dim=8, ignore_index=IGNORE, total_iters=100).double()
    ref = Reference(c)
    gen = torch.Generator().manual_seed(7)
    for step in range(len(STEP_CLASSES)):
        logits, emb, fine = make_batch(step, gen)
        total, terms = crit(logits, emb, fine, iteration=step)
        want = ref.step(logits, emb, fine)
        assert set(terms) == set(want) - {"total"}
        for name, value in terms.items():
            if want[name] == 0.0:  # align_out with a single coarse class, say; must then be exactly 0
                assert float(value) == 0.0, name
                continue
            assert rel_err(float(value), want[name]) < 1e-6, (step, name, float(value), want[name])
        assert rel_err(float(total), want["total"]) < 1e-6, step
        for memory, ref_mem, K in ((crit.coarse_memory, ref.mem_h, 4), (crit.fine_memory, ref.mem_l, 9)):
            assert memory.seen.tolist() == [k in ref_mem for k in range(K)], step
            for k, v in ref_mem.items():
                err = (memory.protos[k] - v).norm() / v.norm()
                assert float(err) < 1e-6, (step, k)
            for k in set(range(K)) - set(ref_mem):
                assert torch.equal(memory.protos[k], torch.zeros_like(memory.protos[k]))


def test_reference_data_exercises_the_cases_it_claims():
    """Guards the test above: the steps really contain absent, first-seen and single-child classes."""
    gen = torch.Generator().manual_seed(7)
    seen = []
    for step in range(len(STEP_CLASSES)):
        _, emb, fine = make_batch(step, gen)
        lab = {y for plane in ref_labels_at(fine, emb.shape[2], emb.shape[3]) for row in plane for y in row} - {IGNORE}
        seen.append(lab)
    assert 4 in seen[0] and all(4 not in s_ for s_ in seen[1:])  # seen, then absent (memory only)
    assert 6 in seen[2] and all(6 not in s_ for s_ in seen[:2])  # first sighting mid-run
    assert 7 in seen[1]  # coarse 3's only child: l_7 == h_3
    assert not ({5, 6} & seen[3])  # a whole coarse class absent in the last step


def test_fp32_module_agrees_with_float64():
    """The default fp32 buffers and compute give the same terms to fp32 precision."""
    c = cfg()
    crit64 = HiPoSegCriterion(c, FINE_TO_COARSE, 8, IGNORE, 100).double()
    crit32 = HiPoSegCriterion(c, FINE_TO_COARSE, 8, IGNORE, 100)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        logits, emb, fine = make_batch(step, gen)
        t64 = crit64(logits, emb, fine, step)[1]
        t32 = crit32(logits.float(), emb.float(), fine, step)[1]
        for k in t64:
            assert float(t32[k]) == pytest.approx(float(t64[k]), rel=1e-4, abs=1e-6), k
    assert crit32.fine_memory.protos.dtype == torch.float32
    assert torch.allclose(crit32.fine_memory.protos.double(), crit64.fine_memory.protos, atol=1e-5)
