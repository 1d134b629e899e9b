"""The training data stream: which sample, with which augmentation, a step sees.

Global sample position p = iteration * global_batch + rank * local_batch + j; the stream is a pure
function of (seed, p), so an interrupted run resumed at iteration i sees exactly the batches the
uninterrupted run saw from i on, whatever the number of workers or ranks (`PreparedDataset[(index,
seed)]` makes the augmentation a pure function of its seed).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from hiposeg.config import TrainConfig
from hiposeg.distributed import DistEnv
from hiposeg.errors import UserError


class IterationSampler(Sampler[tuple[int, int]]):
    """Global sample position p = iteration * global_batch + rank * local_batch + j.

    Position p is item `perm_e[p mod n]` of epoch e = p // n, where perm_e is a permutation seeded
    by (seed, e); its augmentation seed is a hash of (seed, p). So the data a step sees depends only
    on the seed and the iteration: not on the worker count, the rank count, or interruptions.
    """

    def __init__(self, n: int, local_batch: int, rank: int, world: int, seed: int, start_iter: int) -> None:
        if n == 0:
            raise UserError("the training split is empty")
        self.n, self.b, self.rank, self.world, self.seed, self.start = n, local_batch, rank, world, seed, start_iter
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __iter__(self) -> Iterator[tuple[int, int]]:
        it = self.start
        global_batch = self.b * self.world
        while True:
            for j in range(self.b):
                p = it * global_batch + self.rank * self.b + j
                epoch, k = divmod(p, self.n)
                yield int(self._perm_of(epoch)[k]), (self.seed * 7_919 + p * 104_729 + 12_345) % (2**63 - 1)
            it += 1


def train_loader(cfg: TrainConfig, env: DistEnv, start_iter: int, ignore_index: int) -> DataLoader:
    """This rank's endless stream of augmented training batches from iteration `start_iter`;
    `ignore_index` (the hierarchy's) fills the crop padding."""
    from hiposeg.data.dataset import PreparedDataset
    from hiposeg.data.transforms import train_transforms

    d = cfg.data
    tf = train_transforms(d.crop, d.scale_range, d.hflip, d.color_jitter, d.mean, d.std, ignore_index)
    ds = PreparedDataset(d.resolved_root(), d.train_split, transforms=tf, levels=("fine",), check_values=True)
    local_batch = cfg.optim.batch_size // env.world_size
    sampler = IterationSampler(len(ds), local_batch, env.rank, env.world_size, cfg.run.seed, start_iter)
    return DataLoader(ds, batch_size=local_batch, sampler=sampler, num_workers=d.workers,
                      pin_memory=env.device.type == "cuda", persistent_workers=d.workers > 0,
                      prefetch_factor=4 if d.workers > 0 else None, drop_last=False)
