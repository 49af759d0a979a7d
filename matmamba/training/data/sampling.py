"""Samplers that make the training stream resumable and disjoint across ranks.

The training stream is endless: the concatenation of one random permutation of the dataset per
epoch, each permutation seeded by ``(seed, epoch)``. Rank ``r`` of ``W`` reads the positions
``r, r + W, r + 2W, ...`` of that stream, so ranks never see the same position, and together they
see every sample of an epoch exactly once. Because the stream is a pure function of the seed, a
run resumes at an exact position by starting the sampler at the number of samples the rank has
already consumed: nothing needs to be replayed and no state beyond one integer is kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class StreamSampler(Sampler[int]):
    """Endless, rank-disjoint, resumable stream of dataset indices.

    Args:
        size: number of samples in the dataset.
        shuffle: permute each epoch (otherwise the stream is 0..size-1 repeated).
        seed: base seed of the per-epoch permutations; every rank must use the same one.
        rank, world_size: this process's slot in the stream.
        start: number of samples this rank has already consumed (resume position).
        with_position: yield ``(index, position)`` pairs, where ``position`` is the sample's
            place in the global stream; datasets use it to seed per-sample augmentation so
            that it does not depend on workers or on resuming.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        with_position: bool = False,
    ) -> None:
        if size <= 0:
            raise ValueError(f"StreamSampler needs a non-empty dataset, got size={size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.with_position = with_position

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def global_position(self, local_position: int) -> int:
        return local_position * self.world_size + self.rank

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        position = self.start
        cached_epoch, perm = -1, None
        while True:
            global_position = self.global_position(position)
            epoch, offset = divmod(global_position, self.size)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self.permutation(epoch)
            yield (int(perm[offset]), global_position) if self.with_position else int(perm[offset])
            position += 1


class ShardSampler(Sampler[int]):
    """Finite, ordered, rank-disjoint slice of a dataset: rank r reads r, r + W, r + 2W, ...

    Used for evaluation: no padding and no duplicates, so per-rank sums add up to the exact
    metric over the whole set (ranks may get one sample more or less than each other).
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.size = size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
