"""FSDP2 on 2 CPU processes (gloo).

First ``shard_model`` (what ``trainer=fsdp``'s ``configure_model`` runs) on a CPU device mesh,
with the training step's pattern: several widths' forwards through every block, then one backward
of their summed losses (and the variants: one backward per width, the chunked LM head). Each rank
gets half of the global batch; FSDP averages the ranks' gradients, so the gathered gradients
(``DTensor.full_tensor()``) must equal the unsharded model's on the whole batch. Every case runs
in the same two processes (one spawn) to keep the test short.

Then ``train.py trainer=fsdp`` itself (Lightning's ModelParallelStrategy runs on CPU processes):
train, write a single-file checkpoint and a ``save_pretrained`` export, resume.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_helpers import ROOT, TINY_LM, run_train_script

WIDTHS = (64, 32, 16)
# (case name, shard_model options, mesh: "1d" or a 2-D (replicate, shard) shape, how the step runs)
CASES = [
    ("full_shard", {"reshard_after_forward": True}, "1d", "joint"),
    ("shard_grad_op_checkpointed", {"reshard_after_forward": False, "activation_checkpointing": True}, "1d", "joint"),
    ("full_shard_backward_per_width", {"reshard_after_forward": True}, "1d", "per_width"),
    ("full_shard_chunked_head", {"reshard_after_forward": True, "activation_checkpointing": True}, "1d", "chunked"),
    ("no_shard", {"reshard_after_forward": True}, (2, 1), "joint"),
    ("hybrid_one_node", {"reshard_after_forward": True}, (1, 2), "joint"),
    ("vision_full_shard", {"reshard_after_forward": True, "activation_checkpointing": True}, "1d", "vision"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_lm():
    from matmamba.models.lm import MatMambaConfig, MatMambaLMHeadModel

    torch.manual_seed(0)
    config = MatMambaConfig(d_model=64, n_layer=2, vocab_size=64, d_state=16, headdim=16, chunk_size=16)
    return MatMambaLMHeadModel(config)


def _tiny_vision():
    from matmamba.models.vision import MatMamba2Vision, MatMamba2VisionConfig

    torch.manual_seed(0)
    config = MatMamba2VisionConfig(d_model=64, n_layer=2, d_state=16, headdim=16, chunk_size=16, image_size=8,
                                   patch_size=2, in_chans=1, n_classes=10)
    return MatMamba2Vision(config)


def _model(mode: str):
    return _tiny_vision() if mode == "vision" else _tiny_lm()


def _global_batch():
    return torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))


def _vision_batch(tokens):
    """Images and labels derived from the token batch (so that each rank's half matches)."""
    images = (tokens[:, :16].float() / 64).reshape(-1, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    return images, tokens[:, 0] % 10


def _step(net, tokens, mode: str) -> None:
    """The training step's pattern on ``net``: the widths' forwards, then the backward."""
    import torch.nn.functional as F

    from matmamba.training.losses import LMHeadInput, chunked_lm_cross_entropy

    inputs, target = tokens[:, :-1], tokens[:, 1:]
    total = 0.0
    for w in WIDTHS:
        if mode == "vision":
            images, labels = _vision_batch(tokens)
            loss = F.cross_entropy(net(images, width=w), labels)
        elif mode == "chunked":  # model.head_chunk: hidden states, then the tied head outside forward
            head = LMHeadInput(net.hidden_states(inputs, width=w), net.lm_head.weight)
            loss = chunked_lm_cross_entropy(head, target, 20)
        else:
            loss = F.cross_entropy(net(inputs, width=w).logits.flatten(0, 1), target.flatten())
        if mode == "per_width":
            loss.backward()
        else:
            total = total + loss
    if mode != "per_width":
        total.backward()


def _reference(mode: str):
    net = _model(mode)
    _step(net, _global_batch(), mode)
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(list(net.parameters()), 0.5)
    clipped = {n: p.grad for n, p in net.named_parameters()}
    return grads, norm, clipped, {k: v.clone() for k, v in net.state_dict().items()}


def _check_case(rank: int, options: dict, mesh_kind, mode: str) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from matmamba.training.strategies import shard_model

    if mesh_kind == "1d":
        mesh = init_device_mesh("cpu", (2,))
    else:
        mesh = init_device_mesh("cpu", mesh_kind, mesh_dim_names=("replicate", "shard"))
    net = shard_model(_model(mode), mesh, **options)
    assert shard_model(net, mesh, **options) is net  # idempotent
    assert all(isinstance(p, DTensor) for p in net.parameters())
    expected, expected_norm, expected_clipped, expected_state = _reference(mode)

    _step(net, _global_batch()[2 * rank:2 * rank + 2], mode)  # each rank its half of the batch
    grads = {n: p.grad.full_tensor() for n, p in net.named_parameters()}
    assert set(grads) == set(expected) - {"lm_head.weight"}, set(grads) ^ set(expected)  # tied: one parameter
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)

    # gradient clipping as _clip_gradients does it: a DTensor norm of the whole model
    norm = torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], 0.5)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    torch.testing.assert_close(norm, expected_norm, rtol=1e-4, atol=1e-6)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), expected_clipped[name], rtol=1e-4, atol=1e-6)

    # the full state dict (what checkpoints with state_dict_type=full hold): all on rank 0
    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert set(state) >= set(expected_state) - {"lm_head.weight"}, set(state) ^ set(expected_state)
        for key, value in state.items():
            torch.testing.assert_close(value, expected_state[key], msg=key)
    else:
        assert not state

    # the optimizer step on the shards: DTensor parameters, plain (non-fused) AdamW
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=False)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _step(net, _global_batch()[2 * rank:2 * rank + 2], mode)  # a second step on the updated shards
    assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all() for p in net.parameters())


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, options, mesh_kind, mode in CASES:
            try:
                _check_case(rank, options, mesh_kind, mode)
            except Exception as e:
                raise AssertionError(f"case {name}: {e}") from e
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
def test_fsdp2_shards_train_nested_widths_like_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)


# ---------------------------------------------------------------------------- train.py trainer=fsdp
FSDP_RUN = [
    "experiment=lm_pydoc", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
    "trainer.precision=32-true", "trainer.val_check_interval=100", "trainer.limit_val_batches=1",
    "optim.warmup_steps=1", "optim.total_steps=6", "data.batch_size=4", "data.seq_len=32", "validate=false", "optimized_metric=null",
    "extras.print_config=false", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "logger=csv", *TINY_LM,
]


def _train(tmp_path, name: str, extra: list[str]):
    out = tmp_path / name
    result = run_train_script([*FSDP_RUN, f"hydra.run.dir={out}", *extra], cwd=tmp_path,
                              env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_py_fsdp_on_cpu_checkpoints_exports_and_resumes(tmp_path):
    from matmamba.evaluation import load_lightning_checkpoint, load_pretrained

    first = _train(tmp_path, "first", ["trainer.max_steps=4", f"export_dir={tmp_path}/first/model"])
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and not list(ckpt.parent.glob("*.tmp"))  # one file, written atomically
    state = _load(ckpt)
    assert state["global_step"] == 4 and len(state["rng_states"]) == 2
    assert all(type(v) is torch.Tensor for v in state["state_dict"].values())  # gathered, not DTensors
    assert state["optimizer_states"][0]["state"]  # the full optimizer state
    # eval.py reads it, and the export holds the same weights
    from_ckpt = load_lightning_checkpoint(ckpt).model.state_dict()
    exported = load_pretrained(first / "model").model.state_dict()
    assert from_ckpt.keys() == exported.keys()
    for key, value in from_ckpt.items():
        assert torch.equal(value, exported[key]), key
        assert torch.equal(value, state["state_dict"]["net." + key]), key

    resumed = _train(tmp_path, "resumed", ["trainer.max_steps=6", f"ckpt_path={ckpt}", "export_dir=null"])
    after = _load(resumed / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 6
    assert after["lr_schedulers"][0]["last_epoch"] == 6
    changed = [k for k, v in after["state_dict"].items() if not torch.equal(v, state["state_dict"][k])]
    assert changed  # it trained on from the checkpoint


@pytest.mark.slow
def test_train_py_fsdp_matches_ddp_and_resumes_exactly(tmp_path):
    """FSDP (with activation checkpointing, SHARD_GRAD_OP, a backward per width and gradient
    accumulation) trains the same weights as DDP; a resumed FSDP run continues exactly."""
    ddp = _train(tmp_path, "ddp", ["trainer=ddp", "trainer.max_steps=6", "export_dir=null"])
    fsdp_options = ["trainer.strategy.activation_checkpointing=true", "trainer.strategy.sharding_strategy=SHARD_GRAD_OP",
                    "model.backward_per_width=true", "data.micro_batch_size=1", "export_dir=null"]
    straight = _train(tmp_path, "straight", ["trainer.max_steps=6", *fsdp_options])
    first = _train(tmp_path, "first", ["trainer.max_steps=3", *fsdp_options])
    resumed = _train(tmp_path, "resumed", ["trainer.max_steps=6", *fsdp_options,
                                           f"ckpt_path={first}/checkpoints/last.ckpt"])
    a, b, c = (_load(out / "checkpoints" / "last.ckpt") for out in (straight, resumed, ddp))
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
        torch.testing.assert_close(value, c["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_strategy_options_map_and_refusals():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from matmamba.training.strategies import check_not_fsdp1, fsdp_strategy, is_fsdp

    full = fsdp_strategy()
    assert isinstance(full, ModelParallelStrategy) and is_fsdp(full)
    assert full.shard_options() == {"reshard_after_forward": True, "activation_checkpointing": False}
    assert full._save_distributed_checkpoint is False  # state_dict_type=full: single files
    grad_op = fsdp_strategy(sharding_strategy="SHARD_GRAD_OP", activation_checkpointing=True, state_dict_type="sharded")
    assert grad_op.shard_options() == {"reshard_after_forward": False, "activation_checkpointing": True}
    assert grad_op._save_distributed_checkpoint is True
    with pytest.raises(ValueError, match="FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD"):
        fsdp_strategy(sharding_strategy="ZERO3")
    with pytest.raises(ValueError, match="full, sharded"):
        fsdp_strategy(state_dict_type="local")
    with pytest.raises(ValueError, match="cpu_offload=true is not supported"):
        fsdp_strategy(cpu_offload=True)
    with pytest.raises(TypeError, match="use trainer=fsdp|Use trainer=fsdp"):
        check_not_fsdp1(FSDPStrategy())
