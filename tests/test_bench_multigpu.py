"""scripts/bench_multigpu.py: the train.py commands it composes, how it reads run folders, the
callbacks it relies on (rank-averaged loss, weights across ranks), and whole runs on 2 CPU
processes (gloo) with tiny models."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_helpers import ROOT, compose_cfg, make_image_folder, make_token_shards

from matmamba.training.callbacks import (
    GlobalLossMonitor,
    InputWaitMonitor,
    RankWeightsCheck,
)
from matmamba.training.utils import instantiate_callbacks, validate_config

SCRIPT = ROOT / "scripts" / "bench_multigpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_multigpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script()


def test_dry_run_composes_every_case(tmp_path, capsys):
    assert bench.main(["--dry-run", "--gpus", "2", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    commands = [line.split("$ ", 1)[1] for line in out.splitlines() if "$ " in line]
    by_name = {line.split("]")[0][1:]: line.split("$ ", 1)[1] for line in out.splitlines() if line.startswith("[")
               and "$ " in line}
    assert any("make_bench_data.py tokens" in c for c in commands)
    assert any("make_bench_data.py imagenet" in c for c in commands)
    probe = by_name.pop("allreduce")
    assert "allreduce_probe.py" in probe and "--nproc_per_node=2" in probe and "NCCL_DEBUG=INFO" in probe
    assert set(by_name) == {
        "lm_130m_ddp_1dev", "lm_130m_ddp_1dev_micro8", "lm_130m_ddp_2dev", "lm_130m_ddp_2dev_to20", "lm_130m_ddp_2dev_resume20to40",
        "vision_35m_ddp_1dev", "vision_35m_ddp_2dev", "lm_1_4b_fsdp_2dev", "lm_1_4b_ddp_2dev",
    }
    one, two = by_name["lm_130m_ddp_1dev"], by_name["lm_130m_ddp_2dev"]
    # same per-device micro batch and the same global batch: the 1-device run accumulates 2
    for cmd in (one, two):
        assert "data.batch_size=32 data.micro_batch_size=16" in cmd and "trainer=ddp" in cmd
        assert "callbacks.model_checkpoint=null" in cmd and "validate=false" in cmd
    assert "trainer.devices=1" in one and "trainer.devices=2" in two
    # the loss-noise reference (planned beside the 1-device run, on the other GPU): same global
    # batch in micro batches of half the size
    assert "data.batch_size=32 data.micro_batch_size=8" in by_name["lm_130m_ddp_1dev_micro8"]
    first, resumed = by_name["lm_130m_ddp_2dev_to20"], by_name["lm_130m_ddp_2dev_resume20to40"]
    assert "trainer.max_steps=20" in first and "optim.total_steps=40" in first
    assert "callbacks.model_checkpoint=null" not in first  # it writes last.ckpt
    assert f"ckpt_path={tmp_path}/runs/lm_130m_ddp_2dev_to20/checkpoints/last.ckpt" in resumed
    assert "trainer=fsdp" in by_name["lm_1_4b_fsdp_2dev"] and "trainer=ddp" in by_name["lm_1_4b_ddp_2dev"]
    assert "input_wait" in by_name["vision_35m_ddp_2dev"]
    assert "weights_check" in two and "global_loss" in two
    # every command composes into a valid config with the measuring callbacks (GPU runs: not run here)
    for name, cmd in by_name.items():
        overrides = [o for o in shlex.split(cmd)[2:] if not o.startswith(("hydra.", "ckpt_path="))]
        cfg = compose_cfg(overrides, tmp_path / name)
        validate_config(cfg)
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.trainer.limit_val_batches == 0 and cfg.optimized_metric is None
        kinds = {type(cb) for cb in instantiate_callbacks(cfg.callbacks)}
        assert {GlobalLossMonitor, RankWeightsCheck} <= kinds
        assert (InputWaitMonitor in kinds) == name.startswith("vision")


def test_loss_curve_is_keyed_by_optimizer_step(tmp_path):
    # Under accumulation loggers count batches and repeat the step's values between optimizer steps.
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss_global,train/optimizer_step,perf/tokens_per_sec_per_device\n"
                    "0,1,5.0,1.0,\n0,2,5.0,1.0,\n0,3,4.0,2.0,100.0\n0,4,4.0,2.0,\n0,5,3.5,3.0,\n")
    steps = bench.read_metrics_csv(path)
    assert bench.loss_curve(steps) == [(1, 5.0), (2, 4.0), (3, 3.5)]
    assert bench.series(steps, "perf/tokens_per_sec_per_device") == [(3, 100.0)]
    d = bench.loss_diff([(1, 5.0), (2, 4.0), (3, 3.5)], [(1, 5.0), (2, 4.5), (4, 1.0)])
    assert d["steps"] == 2 and d["max_abs_diff"] == 0.5 and d["step_of_max"] == 2
    assert bench.loss_diff([(1, 1.0)], [(1, 2.0)], lo=1) is None


def _weights_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # forked: no OpenMP pool of the parent
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        module.device = torch.device("cpu")
        trainer = types.SimpleNamespace(world_size=world, global_step=7, strategy=None, is_global_zero=rank == 0)
        RankWeightsCheck(out_file=f"{out_dir}/same.json", strict=True).on_train_end(trainer, module)
        if rank == 1:
            with torch.no_grad():
                module[0].weight[0, 0] += 0.25
        check = RankWeightsCheck(out_file=f"{out_dir}/different.json")
        check.on_train_end(trainer, module)
        assert check.result["status"] == "different"
        with pytest.raises(RuntimeError, match="weights differ across ranks"):  # on every rank
            RankWeightsCheck(strict=True).on_train_end(trainer, module)
    finally:
        dist.destroy_process_group()


def test_rank_weights_check_under_gloo(tmp_path):
    mp.start_processes(_weights_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["status"] == "identical" and same["world_size"] == 2 and same["tensors"] == 4
    assert same["max_abs_diff"] == 0.0 and same["mismatched_tensors"] == 0
    different = json.loads((tmp_path / "different.json").read_text())
    assert different["status"] == "different" and different["mismatched_tensors"] == 1
    assert different["mismatched_names"] == ["0.weight"] and different["max_abs_diff"] == pytest.approx(0.25)


def run_bench(tmp_path, args, timeout=600):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--accelerator", "cpu", "--gpus", "2", "--work-dir", str(tmp_path / "work"),
         "--json", str(out), "--markdown", str(tmp_path / "perf.md"), *args],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture
def tokens(tmp_path):
    return make_token_shards(tmp_path / "tokens", val_tokens=2048, max_tokens=20000, shard_tokens=10000)


# ~80 s on 2 cores (four whole training runs, each its own processes), which took the default suite
# past 10 minutes: run on purpose with -m slow. The default suite keeps DDP through train.py on 2 CPU
# ranks (test_train_ddp.py: weights equal across ranks, each rank its own data, the bf16 gradient
# all-reduce) and this script's plumbing (dry run, loss-curve keys, the weights check under gloo).
@pytest.mark.slow
def test_cpu_ddp_scaling_loss_and_weights(tmp_path, tokens):
    report, stdout = run_bench(tmp_path, ["--cases", "lm_ddp,weights", "--steps", "4", "--tokens-root", str(tokens)])
    runs, case = report["runs"], report["cases"]["lm_ddp"]
    # the third run is the noise reference: 1 device at half the micro batch
    # + the scaling reference (1 device, no accumulation) and the noise reference (half micro batch)
    assert set(runs) == {"lm_130m_ddp_1dev", "lm_130m_ddp_2dev", "lm_130m_ddp_1dev_batch2",
                         "lm_130m_ddp_1dev_micro1"}
    assert all(r["rc"] == 0 and r["global_step"] == 4 for r in runs.values())
    assert [s for s, _ in runs["lm_130m_ddp_1dev"]["loss_curve"]] == [1, 2, 3, 4]
    # 1 process accumulating 2 micro batches = 2 processes: the same loss of the global batch each step
    assert case["loss_1dev_vs_Ndev"]["steps"] == 4 and case["loss_1dev_vs_Ndev"]["max_abs_diff"] < 1e-4
    assert case["loss_same_within_tol"] and case["scaling_efficiency"] > 0
    assert case["loss_1dev_vs_1dev_half_micro"]["steps"] == 4 and "loss_same_within_noise" in case
    # the noise reference keeps the global batch: same loss of the same batch, summed in another order
    assert case["loss_1dev_vs_1dev_half_micro"]["max_abs_diff"] < 1e-4
    assert all(r["throughput_per_device"] > 0 and r["max_rss_gib"] > 0 for r in runs.values())
    weights = report["cases"]["weights"]
    assert weights["identical_across_ranks"] is True
    assert weights["checks"]["lm_130m_ddp_2dev"]["mismatched_tensors"] == 0
    assert report["environment"]["child_env"]["NCCL_NVLS_ENABLE"] == "0"
    assert report["environment"]["versions"]["torch"] == torch.__version__
    assert case["scaling_reference"].startswith("1 device, same per-device batch")
    assert len(report["commands"]) == 4 and "lm_ddp: scaling efficiency" in stdout
    assert "lm_ddp noise reference" in stdout
    assert "| lm_ddp | lm_130m_ddp_2dev | 2 | ok |" in (tmp_path / "perf.md").read_text()


@pytest.mark.slow
def test_cpu_resume_vision_and_large_lm(tmp_path, tokens):
    images = make_image_folder(tmp_path / "imagenet", classes=3, per_class=8, size=40)
    report, _ = run_bench(tmp_path, ["--cases", "resume,vision_ddp,lm_fsdp", "--steps", "6",
                                     "--tokens-root", str(tokens), "--imagenet-root", str(images)])
    resume = report["cases"]["resume"]
    assert resume["resumed_first_step"] == 4 and resume["resumed_global_step"] == 6
    assert resume["continues_curve"] and resume["bitwise_same_curve"]  # float32 on CPU: exact
    vision = report["cases"]["vision_ddp"]
    assert vision["classes"] == 3 and vision["scaling_efficiency"] > 0
    assert vision["runs"] == ["vision_35m_ddp_1dev", "vision_35m_ddp_2dev"]  # no stray runs of other cases
    assert 0 <= vision["input_wait_frac_N"] < 1
    fsdp = report["cases"]["lm_fsdp"]  # FSDP2 (gloo) and DDP both run on CPU
    assert fsdp["fsdp"]["ok"] and fsdp["ddp"]["ok"] and fsdp["ddp_fits"]
    assert fsdp["loss_fsdp_vs_ddp"]["max_rel_diff"] < 1e-3  # float32: the same training
    assert report["failures"] == []


@pytest.mark.slow  # ~15 s, two gloo processes: benchmark plumbing (DDP's sums: test_train_ddp.py)
def test_allreduce_case_measures_the_link_on_cpu(tmp_path):
    """The allreduce case launches scripts/allreduce_probe.py on 2 ranks (gloo here, NCCL on GPUs),
    checks the sums, reports bandwidth per size and what lm_130m's gradient all-reduce costs."""
    assert bench.main(["--accelerator", "cpu", "--cases", "allreduce", "--work-dir", str(tmp_path),
                       "--allreduce-sizes", "1,2", "--time-budget", "120"]) == 0
    report = json.loads((tmp_path / "bench_multigpu.json").read_text())
    ar = report["cases"]["allreduce"]
    assert ar["backend"] == "gloo" and ar["world_size"] == 2
    assert [r["size_mb"] for r in ar["rows"]] == [1.0, 2.0]
    assert all(r["sum_ok"] and r["busbw_gbs"] > 0 for r in ar["rows"])
    assert 120e6 < ar["lm_130m_params"] < 140e6 and ar["lm_130m_grad_allreduce_ms"] > 0
    assert not report["failures"]


def test_ddp_config_choice_reaches_the_ddp_runs(tmp_path, capsys):
    """--ddp-config ddp_bf16_grads: the DDP runs (LM and vision) use it; FSDP's DDP reference does not."""
    assert bench.main(["--dry-run", "--gpus", "2", "--work-dir", str(tmp_path), "--ddp-config", "ddp_bf16_grads"]) == 0
    by_name = {line.split("]")[0][1:]: line.split("$ ", 1)[1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("[") and "$ " in line}
    for name in ("lm_130m_ddp_1dev", "lm_130m_ddp_2dev", "vision_35m_ddp_2dev"):
        assert "trainer=ddp_bf16_grads" in by_name[name], name
    assert "trainer=ddp " in by_name["lm_1_4b_ddp_2dev"] + " "


def test_lm_fsdp_runs_each_sharding_strategy(tmp_path, capsys):
    """--fsdp-sharding: one lm_1_4b FSDP run per strategy (the first under the case's "fsdp" key),
    then DDP; unknown or repeated strategies are refused with the valid ones."""
    assert bench.main(["--dry-run", "--gpus", "2", "--work-dir", str(tmp_path), "--cases", "lm_fsdp",
                       "--fsdp-sharding", "full_shard,SHARD_GRAD_OP"]) == 0
    by_name = {line.split("]")[0][1:]: line.split("$ ", 1)[1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("[") and "$ " in line}
    assert list(by_name) == ["lm_1_4b_fsdp_2dev", "lm_1_4b_fsdp_shard_grad_op_2dev", "lm_1_4b_ddp_2dev"]
    assert "trainer.strategy.sharding_strategy=FULL_SHARD" in by_name["lm_1_4b_fsdp_2dev"]
    assert "trainer.strategy.sharding_strategy=SHARD_GRAD_OP" in by_name["lm_1_4b_fsdp_shard_grad_op_2dev"]
    assert "sharding_strategy" not in by_name["lm_1_4b_ddp_2dev"]
    for name, cmd in by_name.items():
        overrides = [o for o in shlex.split(cmd)[2:] if not o.startswith(("hydra.", "ckpt_path="))]
        validate_config(compose_cfg(overrides, tmp_path / name))
    for bad in ("FOO", "FULL_SHARD,FULL_SHARD"):
        with pytest.raises(SystemExit):
            bench.main(["--dry-run", "--cases", "lm_fsdp", "--fsdp-sharding", bad, "--work-dir", str(tmp_path)])
    assert "give distinct strategies from FULL_SHARD, SHARD_GRAD_OP" in capsys.readouterr().err
