"""Two gloo processes under DistributedDataParallel against one process on the concatenated batch.

With sums and counts all-reduced before dividing, a differentiable all-reduce of the sums, and pixel
terms normalised by the global count, DDP must reproduce the single-process run: identical memory on
both ranks, equal to the single run's; ranks' mean loss = the single loss; DDP-averaged gradients
(and so the weights after SGD steps) = the single run's gradients. Everything runs in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hiposeg.config import LossConfig
from hiposeg.prototypes import HiPoSegCriterion

IGNORE = 255
F2C = [0, 0, 1, 1, 1, 2, 2]
WORLD = 2
STEPS = 4
PER_RANK = 2


class TinyNet(nn.Module):
    """Logits at input size, unit embeddings at half size: both depend on shared parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Conv2d(8, len(F2C), 1)
        self.proj = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        f = torch.tanh(self.stem(x))
        return self.cls(f), F.normalize(self.proj(F.avg_pool2d(f, 2)), dim=1)


def global_batches():
    """STEPS batches of WORLD * PER_RANK images; rank r takes images [r*PER_RANK, (r+1)*PER_RANK)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(STEPS):
        x = torch.randn(WORLD * PER_RANK, 3, 8, 8, generator=gen, dtype=torch.float64)
        # rank 0 sees fine classes 0-3, rank 1 classes 3-6: the global memory needs both
        y = torch.cat([torch.randint(0, 4, (PER_RANK, 8, 8), generator=gen),
                       torch.randint(3, 7, (PER_RANK, 8, 8), generator=gen)])
        y[torch.rand(y.shape, generator=gen) < 0.2] = IGNORE
        if step == 2:
            y[PER_RANK:] = IGNORE  # rank 1 holds no valid pixel at all this step
        out.append((x, y))
    return out


def build():
    torch.manual_seed(0)
    net = TinyNet().double()
    crit = HiPoSegCriterion(LossConfig(schedule="joint"), F2C, 6, IGNORE, total_iters=100).double()
    return net, crit


def train(net, model, crit, batches, rows):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    record = {"loss": [], "grads": []}
    for step, (x, y) in enumerate(batches):
        logits, emb = model(x[rows])
        loss, _ = crit(logits, emb, y[rows], step)
        loss.backward()
        record["loss"].append(loss.detach())
        record["grads"].append([p.grad.clone() for p in net.parameters()])
        opt.step()
        opt.zero_grad()
    record["params"] = [p.detach().clone() for p in net.parameters()]
    record["memory"] = crit.state_dict()
    return record


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        net, crit = build()
        model = nn.parallel.DistributedDataParallel(net)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.save(train(net, model, crit, global_batches(), rows), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    net, crit = build()
    single = train(net, net, crit, global_batches(), slice(None))

    # the memory is bitwise identical on both ranks, and equals the single-process memory
    for k, v in ranks[0]["memory"].items():
        assert torch.equal(v, ranks[1]["memory"][k]), k
        assert torch.allclose(v.double(), single["memory"][k].double(), rtol=0, atol=1e-12), k
    assert single["memory"]["fine_memory.seen"].all()
    for step in range(STEPS):
        mean_loss = sum(r["loss"][step] for r in ranks) / WORLD  # the loss DDP optimises
        assert float(mean_loss) == pytest.approx(float(single["loss"][step]), rel=1e-12, abs=1e-14), step
        for g0, g1, gs in zip(ranks[0]["grads"][step], ranks[1]["grads"][step], single["grads"][step]):
            assert torch.equal(g0, g1)  # DDP averaged them
            assert torch.allclose(g0, gs, rtol=1e-10, atol=1e-13), step
    for p0, ps in zip(ranks[0]["params"], single["params"]):
        assert torch.allclose(p0, ps, rtol=1e-10, atol=1e-13)
