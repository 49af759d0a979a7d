"""Distributed strategies configured for MatMamba models."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: str = "full",
    **kwargs: Any,
) -> FSDPStrategy:
    """FSDP with each residual MatMamba2 block (mixer + norm) as one wrap unit.

    ``use_orig_params`` stays on: width slicing reads views of the original parameters, and the
    optimizer's no-decay groups are built from their names. ``state_dict_type="full"`` writes
    ordinary single-file checkpoints (gathered on rank 0) that ``ckpt_path=`` and eval read.
    """
    from matmamba.models.common import ResidualBlock

    if sharding_strategy not in SHARDING_STRATEGIES:
        raise ValueError(
            f"trainer.strategy.sharding_strategy must be one of {SHARDING_STRATEGIES}, got {sharding_strategy!r}"
        )
    if state_dict_type not in ("full", "sharded"):
        raise ValueError(f"trainer.strategy.state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
    return FSDPStrategy(
        auto_wrap_policy={ResidualBlock},
        activation_checkpointing_policy={ResidualBlock} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        use_orig_params=True,
        **kwargs,
    )
