"""HiPoSeg's training-only branch: hierarchical prototype memory, the loss terms and the phase schedule.

Paper Sec. 3 (equation numbers cited next to the code that computes them); every choice the paper
leaves open is decided here, next to the code that makes it (summarised in the README's method section).

One training step, for a batch of L2-normalised pixel embeddings z (eq. 3, from `model.ProjectionHead`)
and FINE labels y (the coarse labels are y' = pi(y), eq. 2):

1. Labels go to the embedding resolution by nearest sampling (centred, i.e. `nearest-exact`: feature
   pixel i of a stride-s map sits at input pixel s*i + (s-1)/2 under align_corners=False, which the
   centred sample s*i + s//2 matches; plain `nearest` would be off by (s-1)/2 pixels). Ignore pixels
   drop out.
2. Per-class sums and counts of z with one `index_add` / `bincount` over the fine classes (O(N*d),
   never N x N); the coarse sums are the fine sums added up through pi (eq. 5 at both levels from one
   pass). Under torch.distributed the sums and counts are all-reduced BEFORE dividing, so every rank
   gets the exact global batch mean; the sum's all-reduce is differentiable (its backward sums the
   ranks' gradients), so gradients flow through the global mean.
3. Batch prototypes mu_hat = normalise(sum / count) (eqs. 5-6). The prototypes the losses use are
   P_c = normalise(m * M_c + (1 - m) * mu_hat_c) (eq. 15, renormalised; M_c detached, gradient through
   mu_hat_c) for classes in the batch, mu_hat_c on a class's first sighting, M_c (no gradient) for
   classes seen before but absent now; classes never seen are masked out of every loss. The memory
   then stores P.detach(): it IS the eq.-15 update. A level's memory changes only while a term that
   uses that level is active, and only in training mode.
4. Losses (all from unit vectors, delta^2(a, b) = 2 - 2<a, b>):
   L_fh (7) / L_fl (9): an N x K matmul + log-softmax over the classes that have a prototype, averaged
   over the valid pixels |N*|; L_hh (8) / L_ll (10): a K x K matmul, averaged over ordered pairs i != k
   of classes that have a prototype (|Y|(|Y| - 1) counts those classes only); L_align.in (11): averaged
   over the fine classes that have a prototype and whose parent has one ("|Y^L|" counts exactly these);
   L_align.out (12): ordered pairs of coarse classes with a prototype. delta = sqrt(max(delta^2, tiny)):
   a coarse class with a single fine child present gives l == h exactly, and sqrt'(0) would be NaN.
   The branch runs in fp32 (autocast disabled), or in float64 if the module is `.double()`.
5. Total (eq. 14) = lambda_ce*CE + lambda_fh*L_fh + lambda_hh*L_hh + lambda_fl*L_fl + lambda_ll*L_ll
   + lambda_align*(alpha*L_align.in + beta*L_align.out) (eq. 13); the paper's lambda_1..lambda_6 are
   lambda_ce, lambda_fh, lambda_hh, lambda_fl, lambda_ll, lambda_align. CE averages over valid label pixels.
   Outside eq. 14: with `model.aux_head`, aux_weight * (the auxiliary head's CE, averaged as CE is;
   mmsegmentation's DeepLabV3+ recipe, not the paper's), logged as "aux".

Exactness under DDP: CE, eq. 7 and eq. 9 are sums over this rank's pixels times world_size / (GLOBAL
count of valid pixels), and the prototype terms depend on global quantities only. DDP averages the
ranks' gradients, which then equals the gradient of the single-process loss on the concatenated batch;
the mean of the ranks' loss values equals that loss. Every phase builds the same graph on every rank
(an unused head joins with weight 0), so DDP never sees unused parameters.

Defaults the paper does not give (LossConfig; all configurable):
  tau = 0.1      eqs. 7/9. ContrastiveSeg's best pixel-contrast temperature (0.05/0.07/0.1/0.2 gave
                 79.8/79.6/80.2/80.0 mIoU). With s = -delta^2 the logits are 2<z,p>/tau + const, so this
                 is a cosine softmax at scale 20.
  kappa = 1      eqs. 8/10. exp(-delta^2/kappa) with delta^2 in [0, 4] then spans [e^-4, 1]: the push
                 stays smooth and non-saturated over the whole sphere; a small kappa makes the term and
                 its gradient vanish for any moderately separated pair.
  lambda_ce = 1  CE is the task loss, as in eq. 14's first term.
  lambda_2..6 = 0.1  ContrastiveSeg's auxiliary weight: the branch steers the features an order of
                 magnitude below the task loss (ProtoSeg uses 0.01/0.001 for its two terms).
  alpha = beta = 1  both parts of eq. 13 are hinges on the same distance scale (delta in [0, 2]).
  sigma1 = 0.25, sigma2 = 1.0, m = 0.9 (loss.memory_momentum): the paper (Sec. 3.2, Tables 10 and 11).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiposeg.config import COARSE_LEVEL_TERMS, FINE_LEVEL_TERMS, PHASE_GROUPS, PHASE_NAMES, LossConfig, phase_starts
from hiposeg.distributed import sum_over_ranks, world_size

DELTA_SQ_MIN = 1e-12  # floor of delta^2 before sqrt (eqs. 11/12): finite gradients at delta = 0


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def labels_at(target: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) labels sampled at the centres of an (h, w) grid: F.interpolate 'nearest-exact', exact
    for any integer dtype (source index floor((i + 0.5) * H / h))."""
    H, W = target.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return target

    def centres(n: int, n_src: int) -> Tensor:
        i = torch.arange(n, device=target.device, dtype=torch.float64)
        return ((i + 0.5) * (n_src / n)).floor().long().clamp_(max=n_src - 1)

    return target[:, centres(h, H)[:, None], centres(w, W)[None, :]]


def _delta(delta_sq: Tensor) -> Tensor:
    """Euclidean distance from delta^2 = 2 - 2<a, b>, with a floor so sqrt has a finite gradient at 0."""
    return delta_sq.clamp(min=DELTA_SQ_MIN).sqrt()


def _off_diagonal_pairs(has_proto: Tensor) -> tuple[Tensor, Tensor]:
    """Mask of ordered pairs (i, k), i != k, both with a prototype, and their number |Y|(|Y| - 1)."""
    k = has_proto.numel()
    pairs = has_proto[:, None] & has_proto[None, :] & ~torch.eye(k, dtype=torch.bool, device=has_proto.device)
    n = has_proto.sum()
    return pairs, n * (n - 1)


def feature_prototype_nll(z: Tensor, labels: Tensor, protos: Tensor, has_proto: Tensor, tau: float) -> Tensor:
    """Sum over pixels of -log softmax_y(s(z, p_y) / tau), the summand of eqs. 7 and 9.

    labels: (N,) class ids, == K (= protos.shape[0]) for pixels that do not count.
    s(z, p) / tau = (2<z, p> - 2) / tau: the -2/tau is the same for every class and cancels in the
    softmax, so the logits are one fused matmul. Classes without a prototype get the dtype's lowest
    value as bias: they leave the softmax, and a row with no prototype at all stays finite.
    """
    bias = z.new_zeros(protos.shape[0]).masked_fill_(~has_proto, torch.finfo(z.dtype).min)
    logits = torch.addmm(bias, z, protos.T, alpha=2 / tau)  # s(z, p)/tau + const   (eqs. 7/9)
    return F.cross_entropy(logits, labels, ignore_index=protos.shape[0], reduction="sum")


def prototype_repulsion(protos: Tensor, has_proto: Tensor, kappa: float) -> Tensor:
    """Eqs. 8 / 10: mean over ordered pairs i != k of exp(s(p_i, p_k) / kappa)."""
    s = -(2 - 2 * (protos @ protos.T))  # s(p_i, p_k) = -delta^2
    pairs, n_pairs = _off_diagonal_pairs(has_proto)
    return (torch.exp(s / kappa) * pairs).sum() / n_pairs.clamp(min=1)  # eqs. 8/10


def align_in(fine: Tensor, coarse: Tensor, fine_has: Tensor, coarse_has: Tensor, fine_to_coarse: Tensor,
             sigma1: float) -> Tensor:
    """Eq. 11: mean over fine classes j (with prototypes l_j and h_pi(j)) of max(0, delta(l_j, h_pi(j)) - sigma1)."""
    parent = coarse[fine_to_coarse]
    dist_to_parent = _delta(2 - 2 * (fine * parent).sum(dim=1))
    counted = fine_has & coarse_has[fine_to_coarse]
    return (F.relu(dist_to_parent - sigma1) * counted).sum() / counted.sum().clamp(min=1)  # eq. 11


def align_out(coarse: Tensor, coarse_has: Tensor, sigma2: float) -> Tensor:
    """Eq. 12: mean over ordered pairs i != k of coarse classes of max(0, sigma2 - delta(h_i, h_k))."""
    d = _delta(2 - 2 * (coarse @ coarse.T))
    pairs, n_pairs = _off_diagonal_pairs(coarse_has)
    return (F.relu(sigma2 - d) * pairs).sum() / n_pairs.clamp(min=1)  # eq. 12


# --------------------------------------------------------------------------------------------
# Memory and schedule
# --------------------------------------------------------------------------------------------


class PrototypeMemory(nn.Module):
    """fp32 buffers: protos (K, d) unit rows, seen (K,) bool. Saved in state_dict (checkpoints).

    M^H or M^L of eq. 4. Buffers, not parameters: the optimiser never touches them; they change only
    through `update_` (eq. 15). The slot of a class never seen holds zeros (`blend` relies on it).
    """

    protos: Tensor
    seen: Tensor

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.register_buffer("protos", torch.zeros(num_classes, embed_dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def blend(self, batch: Tensor, present: Tensor, momentum: float) -> tuple[Tensor, Tensor]:
        """(P, has_proto): the prototypes the losses use this step (step 3 of the module docstring).

        batch: (K, d) normalised batch means mu_hat (eq. 6), carrying gradient; present: (K,) bool.
        """
        memory = self.protos.detach().clone()  # cloned: update_ changes the buffers in place before backward
        # eq. 15, renormalised. A never-seen slot holds zeros, so on a first sighting this is mu_hat itself.
        blended = F.normalize(momentum * memory + (1 - momentum) * batch, dim=1)
        protos = torch.where(present[:, None], blended, memory)
        return protos, present | self.seen

    @torch.no_grad()
    def update_(self, protos: Tensor, present: Tensor) -> None:
        """Eq. 15: the classes in the batch take the blended (renormalised) prototypes; others keep theirs."""
        self.protos.copy_(torch.where(present[:, None], protos.detach().to(self.protos.dtype), self.protos))
        self.seen |= present


class PhaseSchedule:
    """Which loss terms are on at an iteration (0-based).

    sequential (paper Sec. 3.2): CE only until phases[0]*T, + fh, hh from there, + fl, ll from
    phases[1]*T, + align from phases[2]*T. joint (Table 12): every configured term from iteration 0.
    Always intersected with the configured terms; 'ce' is always on. The arguments are a validated
    LossConfig's (`config.LossConfig`: the vocabulary and its rules live there).
    """

    def __init__(self, terms: Iterable[str], schedule: str, phases: tuple[float, float, float], total_iters: int) -> None:
        self.terms = frozenset(terms) | {"ce"}
        self.schedule = schedule
        self.starts = phase_starts(schedule, phases, total_iters)

    def active(self, iteration: int) -> frozenset[str]:
        on = {"ce"}
        for start, group in zip(self.starts, PHASE_GROUPS):
            if iteration >= start:
                on |= group
        return frozenset(on) & self.terms

    def phase_name(self, iteration: int) -> str:
        if self.schedule == "joint":
            return "joint"
        return PHASE_NAMES[sum(iteration >= s for s in self.starts)]


# --------------------------------------------------------------------------------------------
# The criterion
# --------------------------------------------------------------------------------------------


class HiPoSegCriterion(nn.Module):
    """Eq. 14: lambda_ce*CE + lambda_fh*L_fh + lambda_hh*L_hh + lambda_fl*L_fl + lambda_ll*L_ll + lambda_align*(alpha*in + beta*out).

    Holds the two prototype memories (coarse = high level, fine = low level) and the phase schedule.
    `needs_embeddings` is False for a pure-CE configuration: then no projection head is built.
    `aux_weight` weighs the auxiliary head's CE, a term outside eq. 14 (when the net has that head).
    """

    fine_to_coarse: Tensor
    fine_to_coarse_or_dump: Tensor

    def __init__(self, cfg: LossConfig, fine_to_coarse: Tensor | np.ndarray, embed_dim: int, ignore_index: int,
                 total_iters: int, aux_weight: float = 0.0) -> None:
        super().__init__()
        lut = torch.as_tensor(np.asarray(fine_to_coarse), dtype=torch.long)
        if lut.ndim != 1 or lut.numel() == 0 or int(lut.min()) < 0:
            raise ValueError("fine_to_coarse must be a non-empty 1-D array of coarse ids >= 0")
        self.cfg = cfg
        self.num_fine = lut.numel()
        self.num_coarse = int(lut.max()) + 1
        if 0 <= ignore_index < self.num_fine:
            raise ValueError(f"ignore_index {ignore_index} collides with fine class ids 0..{self.num_fine - 1}")
        self.ignore_index = ignore_index
        self.embed_dim = embed_dim
        self.register_buffer("fine_to_coarse", lut, persistent=False)  # pi (eq. 2); from the hierarchy, not saved
        # pi extended by one entry: the fine dump slot K_L (ignore pixels) maps to the coarse dump slot K_H
        self.register_buffer("fine_to_coarse_or_dump", torch.cat([lut, lut.new_tensor([self.num_coarse])]),
                             persistent=False)
        self.coarse_memory = PrototypeMemory(self.num_coarse, embed_dim)  # M^H (eq. 4)
        self.fine_memory = PrototypeMemory(self.num_fine, embed_dim)  # M^L (eq. 4)
        self.schedule = PhaseSchedule(cfg.terms, cfg.schedule, cfg.phases, total_iters)
        self.needs_embeddings = bool(set(cfg.terms) - {"ce"})
        self.aux_weight = aux_weight

    def forward(self, logits: Tensor, embeddings: Tensor | None, target: Tensor, iteration: int,
                aux_logits: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """logits (B, K_L, H, W); embeddings (B, d', h, w) unit vectors over d' (eq. 3) or None; target (B, H, W)
        integer FINE labels with ignore_index, at the logits' size; aux_logits like logits or None. Returns
        (total, {term: detached unweighted value}) for the active terms. Under DDP, "ce", "fh", "fl" and
        "aux" are this rank's share of the global pixel mean (their mean over ranks is the global value);
        the other terms are global already."""
        active = self.schedule.active(iteration)
        uses_coarse, uses_fine = bool(active & COARSE_LEVEL_TERMS), bool(active & FINE_LEVEL_TERMS)
        if (uses_coarse or uses_fine) and embeddings is None:
            raise ValueError(f"loss terms {sorted(active - {'ce'})} are active at iteration {iteration} but no "
                             "embeddings were given (build HiPoSegNet with_projection=True)")
        if embeddings is not None and embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings have {embeddings.shape[1]} channels, the memory expects {self.embed_dim}")
        cfg, ws = self.cfg, world_size()
        dtype = self.fine_memory.protos.dtype  # fp32 (float64 when the module is .double())
        target = target.long()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            valid_pixels = (target != self.ignore_index).sum().reshape(1)
            if uses_coarse or uses_fine:
                y = labels_at(target, embeddings.shape[-2:]).reshape(-1)
                y = torch.where(y == self.ignore_index, self.num_fine, y)  # ignore -> dump slot K_L
                counts = torch.bincount(y, minlength=self.num_fine + 1)[: self.num_fine]
                counts = sum_over_ranks(torch.cat([valid_pixels, counts]))  # global; ints, no gradient
                valid_pixels, counts = counts[:1], counts[1:]
            else:
                valid_pixels = sum_over_ranks(valid_pixels)
            valid_pixels = valid_pixels[0]  # global count of valid label pixels (CE's average)

            terms: dict[str, Tensor] = {"ce": self._pixel_ce(logits.to(dtype), target, valid_pixels, ws)}
            total = cfg.lambda_ce * terms["ce"]  # eq. 14, lambda_1
            if aux_logits is not None:  # outside eq. 14: the auxiliary head's CE
                terms["aux"] = self._pixel_ce(aux_logits.to(dtype), target, valid_pixels, ws)
                total = total + self.aux_weight * terms["aux"]

            if uses_coarse or uses_fine:
                total = total + self._prototype_terms(embeddings.to(dtype), y, counts, active, uses_coarse,
                                                      uses_fine, ws, terms)
            elif embeddings is not None:
                total = total + 0.0 * embeddings.sum()  # head unused this phase: keep it in the graph for DDP
        return total, {k: v.detach() for k, v in terms.items()}

    def _pixel_ce(self, logits: Tensor, target: Tensor, valid_pixels: Tensor, ws: int) -> Tensor:
        """Cross-entropy averaged over the global valid label pixels (this rank's share under DDP)."""
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
        return ce * ws / valid_pixels.clamp(min=1)

    def _prototype_terms(self, embeddings: Tensor, y: Tensor, counts: Tensor, active: frozenset[str],
                         uses_coarse: bool, uses_fine: bool, ws: int, terms: dict[str, Tensor]) -> Tensor:
        """Eqs. 5-13 and their weighted sum (the part of eq. 14 after CE). Fills `terms`."""
        cfg = self.cfg
        d = embeddings.shape[1]
        z = embeddings.permute(0, 2, 3, 1).reshape(-1, d)  # (N, d) unit rows z~ (eq. 3)
        sums = z.new_zeros(self.num_fine + 1, d).index_add(0, y, z)[: self.num_fine]  # numerators of eq. 5
        sums = sum_over_ranks(sums, differentiable=True)  # global sums; gradient reaches every rank
        n_valid = counts.sum()  # |N*|: global valid pixels at embedding resolution
        pixel_scale = ws / n_valid.to(z.dtype).clamp(min=1)  # this rank's share of a global pixel mean
        total = embeddings.new_zeros(())

        if uses_coarse:
            coarse_sums = sums.new_zeros(self.num_coarse, d).index_add(0, self.fine_to_coarse, sums)
            coarse_counts = counts.new_zeros(self.num_coarse).index_add(0, self.fine_to_coarse, counts)
            h, has_h = self._level_prototypes(self.coarse_memory, coarse_sums, coarse_counts)  # mu^i, H
            if "fh" in active:
                y_coarse = self.fine_to_coarse_or_dump[y]  # eq. 2: y' = pi(y); the dump slot stays the dump slot
                terms["fh"] = feature_prototype_nll(z, y_coarse, h, has_h, cfg.tau) * pixel_scale  # eq. 7
                total = total + cfg.lambda_fh * terms["fh"]  # eq. 14, lambda_2
            if "hh" in active:
                terms["hh"] = prototype_repulsion(h, has_h, cfg.kappa)  # eq. 8
                total = total + cfg.lambda_hh * terms["hh"]  # eq. 14, lambda_3

        if uses_fine:
            lo, has_lo = self._level_prototypes(self.fine_memory, sums, counts)  # mu^i_j, L
            if "fl" in active:
                terms["fl"] = feature_prototype_nll(z, y, lo, has_lo, cfg.tau) * pixel_scale  # eq. 9
                total = total + cfg.lambda_fl * terms["fl"]  # eq. 14, lambda_4
            if "ll" in active:
                terms["ll"] = prototype_repulsion(lo, has_lo, cfg.kappa)  # eq. 10
                total = total + cfg.lambda_ll * terms["ll"]  # eq. 14, lambda_5

        if "align" in active:
            terms["align_in"] = align_in(lo, h, has_lo, has_h, self.fine_to_coarse, cfg.sigma1)  # eq. 11
            terms["align_out"] = align_out(h, has_h, cfg.sigma2)  # eq. 12
            terms["align"] = cfg.alpha * terms["align_in"] + cfg.beta * terms["align_out"]  # eq. 13
            total = total + cfg.lambda_align * terms["align"]  # eq. 14, lambda_6
        return total  # eq. 14 without the CE term

    def _level_prototypes(self, memory: PrototypeMemory, sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """One level's prototypes for the losses, and which classes have one: batch means (eq. 5),
        normalised (eq. 6), blended with the memory (eq. 15), which keeps them while training."""
        mu = sums / counts.clamp(min=1)[:, None].to(sums.dtype)  # eq. 5
        present = counts > 0
        protos, has_proto = memory.blend(F.normalize(mu, dim=1), present, self.cfg.memory_momentum)  # eqs. 6, 15
        if self.training:
            memory.update_(protos, present)  # eq. 15
        return protos, has_proto
