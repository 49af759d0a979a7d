"""The Python documentation bundled with CPython (``pydoc_data.topics``) as byte-level LM data."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from matmamba.training.data.base import DataConfigError, NestedDataModule


def pydoc_text() -> str:
    """All pydoc topics joined in a fixed (sorted) order: about 466 KB of English and code."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary of 256, one token per byte."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets) of one sequence."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if tokens.numel() < seq_len + 1:
            raise DataConfigError(
                f"a split of {tokens.numel()} tokens is too short for data.seq_len={seq_len}"
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].long()


class PydocDataModule(NestedDataModule):
    """Byte-level language modelling on the pydoc topics; the last ``val_fraction`` is validation.

    Batches are ``(batch, seq_len + 1)`` int64 token tensors.
    """

    task = "lm"
    vocab_size = ByteTokenizer.vocab_size
    bytes_per_token = 1.0

    def __init__(
        self,
        *,
        batch_size: int = 16,
        micro_batch_size: int | None = None,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        seed: int = 0,
        seq_len: int = 256,
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        if seq_len <= 0:
            raise DataConfigError(f"data.seq_len must be positive, got {seq_len}")
        if not 0.0 < val_fraction < 1.0:
            raise DataConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")

    def build_datasets(self) -> None:
        data = torch.tensor(ByteTokenizer().encode(pydoc_text()), dtype=torch.uint8)
        split = int(data.numel() * (1.0 - self.hparams.val_fraction))
        self.train_set = TokenWindows(data[:split], self.hparams.seq_len)
        self.val_set = TokenWindows(data[split:], self.hparams.seq_len)
