"""DDP on 2 CPU processes (gloo): weights stay identical across ranks and ranks get disjoint data."""

import json

import pytest
import torch
from training_helpers import ROOT, TINY_VISION, one_thread, run_train_script

DIGITS_TINY = [o.replace("++", "++") for o in TINY_VISION] + [
    "++model.overrides.image_size=8", "++model.overrides.patch_size=2", "++model.overrides.in_chans=1",
    "++model.overrides.chunk_size=17",
]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def ddp_run(tmp_path, name, extra):
    out = tmp_path / name
    args = [
        "experiment=digits", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "optim.warmup_steps=1", "data.batch_size=16", "extras.print_config=false", "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false", "export_dir=null", f"hydra.run.dir={out}",
        "+callbacks.probe._target_=training_helpers.DDPProbe", f"+callbacks.probe.out_dir={out}/probe",
        *DIGITS_TINY, *extra,
    ]
    result = run_train_script(args, cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(out / "probe" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks


def check_ranks(ranks):
    assert [r["world_size"] for r in ranks] == [2, 2]
    a, b = (r["state_dict"] for r in ranks)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs across ranks"
    seen = [set(r["fingerprints"]) for r in ranks]
    assert len(ranks[0]["fingerprints"]) == 4 * 8  # 4 steps of 8 images per rank
    assert not seen[0] & seen[1], "ranks saw the same images"


@pytest.fixture(scope="module")
def plain_ddp(tmp_path_factory):
    """One plain (fp32) 2-process run, shared by the tests that only read it."""
    with one_thread():
        return ddp_run(tmp_path_factory.mktemp("ddp_plain"), "ddp", [])


def test_ddp_two_cpu_processes(plain_ddp):
    out, ranks = plain_ddp
    check_ranks(ranks)
    report = json.loads((out / "metrics.json").read_text())
    assert report["global_step"] == 4 and len(report["widths"]) == 4
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_with_backward_per_width_and_accumulation(tmp_path):
    """Several backward passes per step: gradients are all-reduced once per optimizer step."""
    _, plain = ddp_run(tmp_path, "plain", [])
    _, ranks = ddp_run(tmp_path, "per_width", ["model.backward_per_width=true", "data.micro_batch_size=4"])
    check_ranks(ranks)
    # Same data, same math: the result matches the single-backward run up to float rounding.
    for key, value in plain[0]["state_dict"].items():
        torch.testing.assert_close(ranks[0]["state_dict"][key], value, rtol=1e-4, atol=1e-5)


def check_bf16_run_against_fp32(fp32_run, bf16_run):
    """bf16-rounded gradients change the weights (else the compression never ran) by little: the
    validation loss after a few steps agrees with the fp32 run's to 0.1%. (Adam normalises each
    update, so near-zero gradients can flip an element's step: the weights are not compared
    elementwise.)"""
    (fp32_out, fp32_ranks), (bf16_out, bf16_ranks) = fp32_run, bf16_run
    fp32_w, bf16_w = fp32_ranks[0]["state_dict"], bf16_ranks[0]["state_dict"]
    assert any(not torch.equal(bf16_w[k], v) for k, v in fp32_w.items()), \
        "the bf16 all-reduce changed nothing: the comm hook was not applied"
    assert max((bf16_w[k] - v).abs().max().item() for k, v in fp32_w.items() if v.is_floating_point()) < 1e-2
    loss = [json.loads((out / "metrics.json").read_text())["summary"]["val/loss"] for out in (fp32_out, bf16_out)]
    assert abs(loss[1] - loss[0]) <= 1e-3 * abs(loss[0]), loss


def test_ddp_bf16_gradient_all_reduce(tmp_path, plain_ddp):
    """trainer=ddp_bf16_grads: DDP's reducer sends the gradients in bf16 (its comm hook, which we
    also register on CPU, where Lightning does not); ranks stay identical."""
    plain = plain_ddp
    compressed = ddp_run(tmp_path, "bf16", ["trainer=ddp_bf16_grads"])
    check_ranks(compressed[1])
    check_bf16_run_against_fp32(plain, compressed)


@pytest.mark.slow
def test_ddp_bf16_gradients_with_accumulation(tmp_path):
    """With accumulation the step all-reduces the gradients itself, in the comm hook's dtype."""
    plain = ddp_run(tmp_path, "fp32", ["data.micro_batch_size=4"])
    compressed = ddp_run(tmp_path, "bf16", ["trainer=ddp_bf16_grads", "data.micro_batch_size=4"])
    check_ranks(compressed[1])
    check_bf16_run_against_fp32(plain, compressed)


def test_other_comm_hooks_are_refused_where_the_step_syncs_itself():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from matmamba.training.modules import manual_sync_dtype

    assert manual_sync_dtype(default_hooks.bf16_compress_hook) == torch.bfloat16
    assert manual_sync_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="use bf16_compress_hook .trainer=ddp_bf16_grads."):
        manual_sync_dtype(lambda state, bucket: None)
