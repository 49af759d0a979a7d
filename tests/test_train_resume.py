"""Checkpoints resume exactly: N steps + resume + N steps gives the same model, optimizer and
scheduler state as 2N steps straight (data position and RNG restored too)."""

import pytest
import torch
from training_helpers import FAST, TINY_LM, TINY_VISION, compose_cfg, make_token_shards, one_thread

from matmamba.training.pipeline import train

DIGITS_TINY = TINY_VISION + [
    "++model.overrides.image_size=8", "++model.overrides.patch_size=2", "++model.overrides.in_chans=1",
    "++model.overrides.chunk_size=17", "data.batch_size=16",
    # randomness inside training: drop path, and a random subset of widths each step
    "++model.overrides.drop_path_rate=0.2", "model.widths_per_step=2", "model.distill.weight=0.5",
]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for idx in opt_a:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[idx][k], opt_b[idx][k]), (idx, k)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def run(overrides, out, steps, ckpt=None):
    extra = [f"trainer.max_steps={steps}", "optim.total_steps=8", "validate=false"]
    if ckpt:
        extra.append(f"ckpt_path={ckpt}")
    train(compose_cfg([*overrides, *extra], out))
    return out / "checkpoints" / "last.ckpt"


def test_resume_is_exact_for_vision(tmp_path):
    base = ["experiment=digits", *FAST, *DIGITS_TINY, "trainer.val_check_interval=3"]
    straight = run(base, tmp_path / "straight", 8)
    first = run(base, tmp_path / "first", 4)  # last.ckpt at step 4, saved at the end of training
    resumed = run(base, tmp_path / "resumed", 8, ckpt=first)
    a, b = load(straight), load(resumed)
    assert load(first)["global_step"] == 4
    assert_same_training_state(a, b)
    data_state = a["DigitsDataModule"]
    assert data_state == b["DigitsDataModule"] and data_state["samples"] == 8 * 16


def test_resume_is_exact_for_token_shards_mid_interval(tmp_path):
    root = make_token_shards(tmp_path / "fw", val_tokens=1000, max_tokens=6000)
    base = ["experiment=lm_130m", "trainer=cpu", *FAST, *TINY_LM, f"data.root={root}", "data.seq_len=32",
            "data.batch_size=4", "data.micro_batch_size=2", "data.num_workers=0", "trainer.val_check_interval=4"]
    straight = run(base, tmp_path / "straight", 6)
    first = run(base, tmp_path / "first", 3)  # stops between two validations, with accumulation 2
    resumed = run(base, tmp_path / "resumed", 6, ckpt=first)
    a, b = load(straight), load(resumed)
    assert_same_training_state(a, b)
    assert a["TokenShardDataModule"]["samples"] == b["TokenShardDataModule"]["samples"] == 6 * 4
