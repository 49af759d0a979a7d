"""The training stream: endless, disjoint across ranks, exactly resumable."""

import itertools

import pytest
from training_helpers import one_thread

from matmamba.training.data.sampling import ShardSampler, StreamSampler


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_one_rank_sees_each_sample_once_per_epoch_in_a_new_order():
    sampler = StreamSampler(10, seed=3)
    first, second = take(sampler, 20)[:10], take(sampler, 20)[10:]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second  # a new permutation every epoch


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_each_epoch(world):
    size = 12
    per_rank = size // world
    streams = [take(StreamSampler(size, seed=1, rank=r, world_size=world), per_rank) for r in range(world)]
    seen = [i for s in streams for i in s]
    assert sorted(seen) == list(range(size))


def test_start_continues_the_stream_exactly():
    full = take(StreamSampler(7, seed=5, rank=1, world_size=2), 25)
    resumed = take(StreamSampler(7, seed=5, rank=1, world_size=2, start=11), 14)
    assert resumed == full[11:]


def test_positions_are_global_and_unique():
    pairs = take(StreamSampler(5, seed=0, rank=1, world_size=2, with_position=True), 4)
    assert [p for _, p in pairs] == [1, 3, 5, 7]


def test_seed_changes_order_and_no_shuffle_is_sequential():
    assert take(StreamSampler(50, seed=0), 50) != take(StreamSampler(50, seed=1), 50)
    assert take(StreamSampler(4, shuffle=False), 6) == [0, 1, 2, 3, 0, 1]


def test_shard_sampler_partitions_without_padding():
    parts = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert [len(ShardSampler(7, rank=r, world_size=3)) for r in range(3)] == [3, 2, 2]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        StreamSampler(0)
    with pytest.raises(ValueError, match="rank"):
        StreamSampler(4, rank=2, world_size=2)
