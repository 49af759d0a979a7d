"""Distributed strategies configured for MatMamba models.

``trainer=fsdp`` is FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's
``ModelParallelStrategy``: Lightning does not wrap the LightningModule; the module shards its
model itself in ``configure_model`` (:func:`shard_model`), and ``training_step`` runs outside any
FSDP forward. That is what our manual-optimization step needs: it runs several widths' forwards,
then ``manual_backward``, then the optimizer step. Lightning's ``FSDPStrategy`` (FSDP1) calls
``training_step`` inside the root unit's forward, so a backward there fails ("Expects
BACKWARD_PRE or BACKWARD_POST state but got HandleTrainingState.FORWARD") and the root's
gradients are never finalized (Lightning issues #19626, #19685); it is refused.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

# sharding_strategy -> how fully_shard applies it (names kept from FSDP1's ShardingStrategy).
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
STATE_DICT_TYPES = ("full", "sharded")


class NestedFSDPStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all devices (``data_parallel_size`` = world size, no tensor
    parallelism), with the sharding options :func:`shard_model` applies in ``configure_model``.

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters resharded after each block's forward,
            gathered again for its backward), ``SHARD_GRAD_OP`` (kept gathered from a block's
            forward to its backward: more memory, fewer all-gathers), ``HYBRID_SHARD`` (sharded
            within a node, replicated across nodes: a 2-D device mesh), ``NO_SHARD`` (replicated
            on every device, gradients all-reduced: DDP through FSDP).
        activation_checkpointing: recompute each residual block's activations in the backward.
        state_dict_type: ``full`` writes single-file checkpoints (gathered on rank 0) that
            ``ckpt_path=``, ``eval.py`` and DDP runs read; ``sharded`` writes a folder of
            per-rank shards (torch.distributed.checkpoint), which Lightning resumes under FSDP
            (but ``eval.py`` does not read, and ``train.py``'s config check wants a file).
        cpu_offload: not supported (refused with an error).
    """

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        activation_checkpointing: bool = False,
        state_dict_type: str = "full",
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        sharding_strategy = str(sharding_strategy).upper()
        if sharding_strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"trainer.strategy.sharding_strategy must be one of {', '.join(SHARDING_STRATEGIES)}, "
                             f"got {sharding_strategy!r}")
        if state_dict_type not in STATE_DICT_TYPES:
            raise ValueError(f"trainer.strategy.state_dict_type must be one of {', '.join(STATE_DICT_TYPES)}, "
                             f"got {state_dict_type!r}")
        if cpu_offload:
            raise ValueError(
                "trainer.strategy.cpu_offload=true is not supported by trainer=fsdp (FSDP2 under Lightning's "
                "ModelParallelStrategy, which moves the sharded model to the GPU after configure_model); "
                "save memory with trainer.strategy.activation_checkpointing=true, a smaller "
                "data.micro_batch_size or model.head_chunk instead")
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            data_parallel_size="auto",  # set to the world size in setup_environment
            tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict_type == "sharded",
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.sharding_strategy = sharding_strategy
        self.activation_checkpointing = bool(activation_checkpointing)
        self.state_dict_type = state_dict_type

    def setup_environment(self) -> None:
        # Every process is one data-parallel rank: a (world size, 1) mesh of
        # ("data_parallel", "tensor_parallel").
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard_options(self) -> dict[str, Any]:
        """What :func:`shard_model` takes besides the model and the mesh."""
        return {
            "reshard_after_forward": self.sharding_strategy != "SHARD_GRAD_OP",
            "activation_checkpointing": self.activation_checkpointing,
        }

    def shard_mesh(self):
        """The mesh ``fully_shard`` runs on: 1-D over all ranks (FULL_SHARD, SHARD_GRAD_OP), or
        2-D (replicate, shard) for HYBRID_SHARD (nodes x devices per node) and NO_SHARD
        (ranks x 1)."""
        if self.sharding_strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        if self.sharding_strategy == "HYBRID_SHARD":
            shape = (self.num_nodes, self.num_processes)
        else:
            shape = (self.num_nodes * self.num_processes, 1)
        if not hasattr(self, "_hsdp_mesh"):  # configure_model runs for fit and again for validate
            self._hsdp_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=("replicate", "shard"))
        return self._hsdp_mesh


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: str = "full",
    **kwargs: Any,
) -> NestedFSDPStrategy:
    """The strategy of ``trainer=fsdp`` (see :class:`NestedFSDPStrategy`)."""
    return NestedFSDPStrategy(
        sharding_strategy=sharding_strategy,
        activation_checkpointing=activation_checkpointing,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        **kwargs,
    )


def is_fsdp(strategy: Any) -> bool:
    """Whether ``strategy`` shards the model with FSDP2 (``trainer=fsdp``, or any Lightning
    ``ModelParallelStrategy``): parameters are DTensors, checkpoints and exports gather them."""
    return isinstance(strategy, ModelParallelStrategy)


def check_not_fsdp1(strategy: Any) -> None:
    """Refuse Lightning's FSDP1 ``FSDPStrategy``: it runs ``training_step`` inside the root
    unit's forward, where our ``manual_backward`` breaks FSDP1's state machine."""
    if isinstance(strategy, FSDPStrategy):
        raise TypeError(
            "Lightning's FSDPStrategy (FSDP1) cannot train MatMamba's nested widths: it calls training_step "
            "inside the root FSDP unit's forward, and the manual backward there fails (Lightning issues "
            "#19626/#19685). Use trainer=fsdp (FSDP2 under ModelParallelStrategy) instead.")


def _residual_block() -> type:
    from matmamba.models.common import ResidualBlock

    return ResidualBlock


def shard_model(
    net: torch.nn.Module,
    mesh,
    *,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """Shard ``net`` in place with FSDP2: each residual block is one unit, the rest of the model
    (embeddings, tied LM head, final norm, classifier) the root unit. Idempotent.

    Width slicing reads views of a block's parameters inside the block's forward, where FSDP2
    has them gathered as plain tensors. The LM's ``hidden_states`` (the chunked head's entry
    point, ``model.head_chunk``) is registered as a forward method of the root so that it, too,
    runs on gathered parameters. ``activation_checkpointing`` recomputes each block's forward in
    the backward (see :func:`checkpoint_block_forward`); parameter names do not change, so
    checkpoints are the same with and without it. Parameters stay float32 (bf16 comes from
    Lightning's autocast, ``precision: bf16-mixed``).
    """
    from torch.distributed.fsdp import (
        FSDPModule,
        fully_shard,
        register_fsdp_forward_method,
    )

    if isinstance(net, FSDPModule):
        return net
    for block in [m for m in net.modules() if isinstance(m, _residual_block())]:
        if activation_checkpointing:
            checkpoint_block_forward(block)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root keeps FSDP's default: not resharded after forward, since the backward gathers it
    # again right away (and the chunked LM head reads the tied head weight after hidden_states).
    fully_shard(net, mesh=mesh)
    if hasattr(type(net), "hidden_states"):
        register_fsdp_forward_method(net, "hidden_states")
    return net


def checkpoint_block_forward(block: torch.nn.Module) -> None:
    """Activation checkpointing of one block: its forward runs under non-reentrant
    ``torch.utils.checkpoint`` (RNG state preserved, so drop path recomputes the same mask).

    The forward method is wrapped in place rather than the block put in torch's
    ``checkpoint_wrapper``: the wrapper inserts ``_checkpoint_wrapped_module.`` into parameter
    names, which Lightning's loading of full checkpoints under ModelParallelStrategy does not
    strip (``ckpt_path=`` then fails with a missing key). Under FSDP2 the block's pre-backward
    hook gathers its parameters before the recomputation needs them.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    if getattr(block, "_matmamba_checkpointed", False):
        return
    forward = block.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed
    block._matmamba_checkpointed = True


def gather_full_model(net: torch.nn.Module) -> torch.nn.Module | None:
    """An unsharded copy of an FSDP2-sharded model, on the CPU of rank 0 (``None`` elsewhere).

    A collective: every rank must call it. Used to export ``save_pretrained`` weights from a
    sharded run; the parameters are gathered one by one onto rank 0's CPU.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    cls = next(c for c in type(net).__mro__ if not issubclass(c, FSDPModule))  # fully_shard's subclass
    with torch.device("meta"):
        plain = cls(net.config)
    # the full state dict names every alias of a tied weight, so assigning leaves nothing on meta
    plain.load_state_dict(state, strict=True, assign=True)
    return plain
