"""Data modules: bundled digits and pydoc text, ImageNet, token shards (FineWeb)."""

from matmamba.training.data.base import DataConfigError, NestedDataModule
from matmamba.training.data.digits import DigitsDataModule
from matmamba.training.data.imagenet import ImageNetDataModule
from matmamba.training.data.pydoc_text import ByteTokenizer, PydocDataModule
from matmamba.training.data.sampling import ShardSampler, StreamSampler
from matmamba.training.data.tokens import TokenShardDataModule, TokenShardError

__all__ = [
    "ByteTokenizer", "DataConfigError", "DigitsDataModule", "ImageNetDataModule", "NestedDataModule",
    "PydocDataModule", "ShardSampler", "StreamSampler", "TokenShardDataModule", "TokenShardError",
]
