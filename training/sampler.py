"""The sampler every training stage uses: this process's share of each epoch, seeded so that any
process count gives the same global batches and a resumed run continues exactly."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class EpochSampler(Sampler):
    """This process's share of an epoch, as ``(index, seed)`` pairs.

    The global order is a permutation seeded by (seed, epoch) (or timm's RepeatAugSampler when
    ``repeats > 1``); process ``rank`` takes every ``world``-th item, so the union of one step's
    micro-batches over processes is the same global batch for any process count. ``start`` skips
    the items already consumed (exact mid-epoch resume). The per-sample seed depends on the
    global position only."""

    def __init__(
        self, n: int, world: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, repeats: int = 0
    ):
        self.n, self.world, self.rank, self.shuffle, self.seed, self.repeats = (
            n,
            world,
            rank,
            shuffle,
            seed,
            repeats,
        )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.repeats > 1 and self.shuffle:
            from timm.data.distributed_sampler import RepeatAugSampler

            sampler = RepeatAugSampler(
                _Sized(self.n),
                num_replicas=self.world,
                rank=self.rank,
                shuffle=True,
                num_repeats=self.repeats,
                # timm < 1.0.31 selects 0 samples per epoch from a set smaller than its 256-sample rounding;
                # no rounding below 256 gives every timm release the same (newer) behaviour.
                selected_round=256 if self.n >= 256 else 0,
            )
            sampler.set_epoch(self.seed * 100003 + self.epoch)
            return list(sampler)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: (-len(order)) % self.world]  # pad to a multiple of the process count
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 10 * max(self.n, 1)
        for pos, idx in enumerate(self.indices()):
            if pos >= self.start:
                yield idx, base + pos * self.world + self.rank
