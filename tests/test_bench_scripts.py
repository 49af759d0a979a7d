"""The benchmark scripts on the CPU: generated data in the real formats reads through the real data
modules, and bench_train.py runs its whole loop (tiny models) and writes every figure."""

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from training_helpers import ROOT, one_thread

from matmamba.training.data import ImageNetDataModule, TokenShardDataModule

sys.path.insert(0, str(ROOT / "scripts"))
import bench_train  # noqa: E402
import make_bench_data  # noqa: E402

TINY_BLOCK = ["d_model=64", "n_layer=2", "d_state=16", "headdim=8", "chunk_size=16"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_imagenet_tree_reads_through_the_datamodule(tmp_path):
    from PIL import Image

    root = tmp_path / "imagenet"
    summary = make_bench_data.main(["imagenet", "--out", str(root), "--classes", "3", "--train-per-class", "3",
                                    "--val-per-class", "1", "--size", "40", "--workers", "2"])
    assert summary["train_images"] == 9 and summary["val_images"] == 3
    files = sorted((root / "train").rglob("*.JPEG"))
    assert len(files) == 9 and len(list((root / "val").rglob("*.JPEG"))) == 3
    assert sorted(p.name for p in (root / "train").iterdir()) == ["n00000000", "n00000001", "n00000002"]
    images = [Image.open(f) for f in files]
    assert all(im.format == "JPEG" and 40 <= min(im.size) and max(im.size) <= 78 for im in images)
    pixels = np.asarray(images[0].convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # not a flat colour
    # Deterministic: the same command writes the same bytes.
    again = tmp_path / "again"
    make_bench_data.make_imagenet(again, classes=3, train_per_class=3, val_per_class=1, size=40, workers=1, quiet=True)
    assert files[4].read_bytes() == (again / files[4].relative_to(root)).read_bytes()

    dm = ImageNetDataModule(source="folder", root=str(root), image_size=32, batch_size=3, num_workers=0,
                            pin_memory=False)
    dm.setup("fit")
    assert dm.num_classes == 3 and len(dm.train_set) == 9
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 32, 32) and torch.isfinite(x).all() and int(y.max()) < 3


def test_token_shards_from_the_stdlib_read_through_the_datamodule(tmp_path):
    from matmamba.training import LanguageModelModule

    root = tmp_path / "tokens"
    meta = make_bench_data.main(["tokens", "--out", str(root), "--tokens", "30000", "--val-tokens", "5000"])
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256
    assert meta["splits"]["val"]["tokens"] == 5000 and meta["splits"]["train"]["tokens"] == 25000
    dm = TokenShardDataModule(root=str(root), seq_len=64, batch_size=4, num_workers=0, pin_memory=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 65) and int(batch.max()) < 256
    text = bytes(np.fromfile(root / "val_000000.bin", dtype="<u2", offset=64).astype(np.uint8)).decode("utf-8")
    assert text.startswith("\0") and ("import " in text or "def " in text)  # Python sources, NUL-separated
    # The byte vocabulary fits lm_130m's (50277): the recipe's model accepts these shards.
    module = LanguageModelModule("lm_130m", overrides={"n_layer": 1, "d_model": 64})
    module.check_data_compat(dm)
    # Explicit sources, repeated to reach the budget.
    src = tmp_path / "doc.txt"
    src.write_text("hello world\n")
    meta = make_bench_data.make_tokens(tmp_path / "t2", tokens=500, val_tokens=100, sources=[str(src)], quiet=True)
    assert meta["splits"]["train"]["tokens"] == 400 and meta["splits"]["train"]["documents"] > 10


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("task", ["lm", "vision"])
def test_bench_train_cpu_smoke(task, tmp_path):
    if task == "lm":
        root = tmp_path / "tokens"
        make_bench_data.make_tokens(root, tokens=40_000, val_tokens=5_000, quiet=True)
        args = ["--cases", "lm_130m", "--token-root", str(root),
                "--model-overrides", *TINY_BLOCK, "vocab_size=256", "--overrides", "data.seq_len=32",
                "data.num_workers=0"]
    else:
        root = tmp_path / "imagenet"
        make_bench_data.make_imagenet(root, classes=4, train_per_class=2, val_per_class=1, size=24, workers=1,
                                      quiet=True)
        args = ["--cases", "vision_35m", "--image-root", str(root),
                "--model-overrides", *TINY_BLOCK, "image_size=16", "patch_size=8",
                "--overrides", "data.image_size=16", "data.num_workers=1"]
    out = tmp_path / "bench.json"
    bench_train.main(["--device", "cpu", "--data", "synthetic,real", "--compile", "off", "--batch", "4",
                      "--steps", "2", "--warmup", "1", "--gemm-size", "128", "--baseline", "--baseline-impl", "dense",
                      "--json", str(out), "--workdir", str(tmp_path / "work"), *args])
    report = json.loads(out.read_text())
    assert report["meta"]["gemm"]["flops_per_s"] > 0 and report["meta"]["versions"]["torch"]
    rows = {(r["data"], bool(r.get("is_baseline"))): r for r in report["rows"]}
    assert set(rows) == {("synthetic", False), ("real", False), ("synthetic", True)}
    for (_, is_baseline), row in rows.items():
        assert row["status"] == "ok", row
        for key in ("items_per_s", "step_ms_wall", "mfu_gemm", "last_loss_sum"):
            assert _finite_positive(row[key]), (key, row[key])
        assert row["widths"] == [64, 32, 16, 8]
        phases = row["phases_ms"]
        assert {"data", "prep", "opt", "fwd@64", "fwd@8"} <= set(phases)
        assert ("bwd@64" in phases) if is_baseline else ("bwd" in phases)  # baseline: per width; ours: joint
        assert all(v["median"] >= 0 for v in phases.values())
    ours = rows[("synthetic", False)]
    assert ours["items_per_step"] == 4 * (32 if task == "lm" else 1)
    assert _finite_positive(ours["ratio"]) and _finite_positive(ours["baseline_step_ms"])
    assert _finite_positive(rows[("real", False)]["loader_items_per_s"])


def test_baseline_mamba2_has_our_dense_sizes():
    """Where mamba_ssm is installed: its Mamba2 built at each width's inner size has exactly the
    parameters of our block's dense submodel at that width."""
    Mamba2, fused, path = bench_train.import_mamba2()
    if Mamba2 is None:
        pytest.skip(path)
    from matmamba.models.block import MatMamba2

    block = MatMamba2(64, d_state=16, headdim=8, chunk_size=16)
    for width in (64, 32, 16, 8):
        m = bench_train.mamba2_at_width(Mamba2, block, width, fused, "cpu")
        assert m.nheads == block.heads_for_width(width) and m.in_proj.in_features == 64
        assert sum(p.numel() for p in m.parameters()) == block.num_params(width)


def test_bench_train_recovers_from_oom_and_reports_failures(tmp_path, monkeypatch):
    """Out of memory at the full micro-batch: halved (accumulating two) and retried. A baseline
    that fails becomes an error row; the run carries on."""
    real_step = bench_train.run_step

    def step_oom_without_accumulation(spec, source, timer, step):
        if spec.accumulate == 1 and not spec.backward_per_width:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(spec, source, timer, step)

    def broken_baseline(run, impl):
        raise RuntimeError("baseline kernel failed (simulated)")

    monkeypatch.setattr(bench_train, "run_step", step_oom_without_accumulation)
    monkeypatch.setattr(bench_train, "build_baseline", broken_baseline)
    out = tmp_path / "bench.json"
    bench_train.main(["--device", "cpu", "--cases", "lm_130m:64/16", "--data", "synthetic", "--compile", "off",
                      "--batch", "4", "--steps", "1", "--warmup", "0", "--gemm-size", "64", "--json", str(out),
                      "--workdir", str(tmp_path / "work"), "--model-overrides", *TINY_BLOCK, "vocab_size=256",
                      "--overrides", "data.seq_len=16"])
    ours, base = json.loads(out.read_text())["rows"]
    assert ours["status"] == "ok" and ours["widths"] == [64, 16]
    assert (ours["batch"], ours["micro_batch"], ours["accumulate"]) == (4, 2, 2)
    assert "OOM at micro-batch 4" in ours["note"] and ours["items_per_step"] == 4 * 16
    assert base["is_baseline"] and base["status"] == "error" and "simulated" in base["reason"]


@pytest.mark.slow  # ~30 s of interpreter: GPU-script plumbing, run with -m slow
def test_tune_ssd_vets_every_candidate_and_survives_a_dying_one(tmp_path):
    """scripts/tune_ssd.py on the CPU (Triton interpreter): every candidate's outputs and
    gradients are checked against float64 in child processes; a child that dies inside a
    candidate (as a faulting kernel kills the CUDA context) or hangs in one is killed, that
    candidate rejected, the child restarted for the rest, and the winner comes from the
    candidates that passed."""
    import os
    import subprocess

    out = tmp_path / "tune.json"
    # item 2 = the second bwd_dbdc candidate dies; item 3 = the first state_pass_bwd one hangs
    env = dict(os.environ, TUNE_SSD_FAULT_AT="2", TUNE_SSD_HANG_AT="3")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_ssd.py"), "--cpu-dry-run",
                           "--shapes", "block", "--kernels", "bwd_dbdc,state_pass_bwd", "--workers", "2",
                           "--candidate-timeout", "15", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert max(max(errs) for errs in report["default_errors"]) < 1e-4
    kernels = report["shapes"]["block"]["kernels"]
    dbdc = kernels["bwd_dbdc"]["rows"]
    assert dbdc[0]["ok"] and dbdc[0]["worst_error"] < 1e-4
    assert not dbdc[1]["ok"] and "process died" in dbdc[1]["error"]
    assert kernels["bwd_dbdc"]["best"]["options"] == dbdc[0]["options"]
    hung, fine = kernels["state_pass_bwd"]["rows"]
    assert not hung["ok"] and "no result after 15 s (killed)" in hung["error"]
    assert fine["ok"] and kernels["state_pass_bwd"]["best"]["options"] == fine["options"]
    assert "2 of them failing to run" in proc.stdout


def test_bench_train_compile_settings_map_to_model_compile(tmp_path):
    """--compile takes off, on or a torch.compile mode, each mapped to the model.compile value of the
    run's overrides; other settings are refused."""
    assert [bench_train.compile_override(s) for s in ("off", "on", "reduce-overhead")] == \
        ["false", "true", "reduce-overhead"]
    args = bench_train.parse_args(["--compile", "off,reduce-overhead", "--device", "cpu",
                                   "--workdir", str(tmp_path)])
    assert args.compile == ["off", "reduce-overhead"]
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--compile", "fast", "--device", "cpu"])


def test_classify_kernel_on_real_kernel_names():
    """--kernel-profile's classification of kernel names as an H200 profile shows them."""
    expected = {
        "_chunk_bwd_dx_kernel": "ssd_scan",
        "_cb_kernel": "ssd_scan",
        "_state_pass_kernel": "ssd_scan",
        "_chunk_states_kernel": "ssd_scan",
        "_state_walk_kernel": "ssd_scan",
        "_finalize_grads_kernel": "ssd_scan",
        "_conv_bwd_du_kernel": "conv1d",
        "_rmsnorm_bwd_kernel": "gated_rmsnorm",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT": "gemm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
        "kernel__5x_cublas": "gemm",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "gemm",
        "triton_tem_fused_mm_0": "gemm",
        "triton_poi_fused_add_mul_0": "inductor_fused",
        "triton_red_fused__to_copy_sum_1": "inductor_fused",
        "triton_per_fused__log_softmax_nll_loss_forward_2": "loss",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
        "at::detail::Array<char*, 1> >(int, at::native::FillFunctor<float>, at::detail::Array<char*, 1>)":
            "elementwise_other",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
        "at::native::sum_functor<float, float, float>::operator()>, unsigned int, float, 4, 4> >":
            "elementwise_other",
        "Memcpy DtoD (Device -> Device)": "elementwise_other",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)": "loss",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer",
        "void at::native::(anonymous namespace)::lpnorm_cleanup<float, (at::native::NormType)1, float, float>":
            "optimizer",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "nccl",
        "void at::native::index_elementwise_kernel<128, 4>": "elementwise_other",
        "aten::mm": "gemm",
        "aten::mul": "other",
        "some_unknown_kernel": "other",
    }
    got = {name: bench_train.classify_kernel(name) for name in expected}
    assert got == expected
    assert set(expected.values()) <= set(bench_train.KERNEL_CATEGORIES) | {"other"}


def test_bench_train_kernel_profile_cpu(tmp_path, capsys):
    """--kernel-profile on the CPU: extra steps after the timed ones are profiled, classified into
    categories whose shares sum to 1, the top kernels listed, a trace written, the block printed."""
    out = tmp_path / "bench.json"
    traces = tmp_path / "traces"
    bench_train.main(["--device", "cpu", "--cases", "lm_130m:64", "--data", "synthetic", "--compile", "off",
                      "--no-baseline", "--batch", "2", "--steps", "1", "--warmup", "0", "--gemm-size", "64",
                      "--kernel-profile", "--kernel-profile-steps", "2", "--kernel-profile-trace", str(traces),
                      "--json", str(out), "--workdir", str(tmp_path / "work"),
                      "--model-overrides", *TINY_BLOCK, "vocab_size=256", "--overrides", "data.seq_len=16"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and _finite_positive(row["step_ms_wall"])
    kp = row["kernel_profile"]
    assert kp["status"] == "ok" and kp["steps"] == 2, kp
    for key in ("kernel_ms_per_step", "busy_ms_per_step", "launches_per_step", "busy_share",
                "profiled_step_ms_wall"):
        assert _finite_positive(kp[key]), (key, kp[key])
    categories = kp["categories"]
    assert set(categories) <= set(bench_train.KERNEL_CATEGORIES) | {"other"} and "gemm" in categories
    assert math.isclose(sum(c["share"] for c in categories.values()), 1.0, rel_tol=1e-6)
    assert math.isclose(sum(c["ms_per_step"] for c in categories.values()), kp["kernel_ms_per_step"], rel_tol=1e-6)
    top = kp["top_kernels"]
    assert 0 < len(top) <= 15 and all(len(k["name"]) <= 80 and k["calls_per_step"] > 0 for k in top)
    assert [k["ms_per_step"] for k in top] == sorted((k["ms_per_step"] for k in top), reverse=True)
    assert kp["trace"] and (traces / "lm_130m-64-synthetic-compile-off.json.gz").is_file()
    printed = capsys.readouterr().out
    assert "-- lm_130m:64 synthetic compile=off: 2 profiled steps" in printed and "top kernels" in printed


def test_tune_ssd_block_layout_times_the_scan_the_block_runs(tmp_path):
    """tune_ssd --layout block calls the scan's forward and backward on views laid out as the
    block's fused core has them, writing the gradients into strided views: that harness computes
    the scan (output and every gradient against the float64 reference), so it times real work."""
    import os
    import subprocess

    script = tmp_path / "check_block_layout.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT / "scripts")!r})
import torch, tune_ssd
from matmamba.ops.ssd import triton_impl
from matmamba.ops.ssd.naive import ssd_scan_naive
torch.manual_seed(0)
run = tune_ssd.block_layout_problem(triton_impl, (2, 37, 3, 8, 1, 16), torch.float32, torch.device("cpu"))
assert run.inputs["x"].stride()[1] != 3 * 8 and run.inputs["dt"].stride()[1] > 3  # views, not copies
y, (dx, ddt, dA, dB, dC, dD, d_bias, _) = run()
assert dx.stride() == run.inputs["x"].stride() and ddt.stride() == run.inputs["dt"].stride()
ref = {{k: v.detach().double().requires_grad_() for k, v in run.inputs.items()}}
y_ref = ssd_scan_naive(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], D=ref["D"],
                       dt_bias=ref["dt_bias"], dt_softplus=True)
(y_ref * run.dy.double()).sum().backward()
got = dict(y=y, x=dx, dt=ddt, A=dA, B=dB, C=dC, D=dD, dt_bias=d_bias)
want = dict(y=y_ref, **{{k: v.grad for k, v in ref.items()}})
for name, value in got.items():
    err = ((value.double() - want[name]).norm() / want[name].norm()).item()
    assert err < 1e-4, (name, err)
print("block layout ok")
""")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "block layout ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_ncu_summary_reads_the_details_csv(tmp_path, capsys):
    """scripts/ncu_summary.py: the rows after ncu's own lines and the program's output, one row per
    launch with the known metrics, thousands separators read, and the mean per kernel."""
    import ncu_summary

    header = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')

    def row(launch, name, unit, value, kernel="_chunk_bwd_dx_kernel"):
        return (f'"{launch}","7","python3","h","{kernel}","1","7","(128, 1, 1)","(768, 16, 1)","0","9.0",'
                f'"Section","{name}","{unit}","{value}"')

    path = tmp_path / "ncu_1.csv"
    path.write_text("\n".join([
        "==PROF== Connected to process 7", "lm_step (32, 1024, 24, 64, 1, 128), block layout: ran 3 times",
        header,
        row(0, "Duration", "msecond", "1.30"), row(0, "SM Frequency", "Ghz", "1.75"),
        row(0, "Achieved Occupancy", "%", "20.5"), row(0, "Registers Per Thread", "register/thread", "168"),
        row(0, "Unrelated Metric", "", "3"),
        row(0, "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "4.5"),
        row(0, "dram__bytes_read.sum", "Mbyte", "12.5"),
        row(0, "lts__t_sectors_srcunit_tex_op_write.sum", "sector", "1,000,000"),
        row(1, "Duration", "msecond", "1.40"), row(1, "SM Frequency", "Ghz", "1.65"),
        row(1, "dram__bytes_read.sum", "Kbyte", "9,500"),
        row(2, "Duration", "usecond", "1,250", kernel="_chunk_bwd_dbdc_kernel"),
        "==PROF== Disconnected from process 7"]))
    summary = ncu_summary.summarize([str(path)])[str(path)]
    assert [launch["id"] for launch in summary["launches"]] == [0, 1, 2]
    first = summary["launches"][0]
    assert first["kernel"] == "_chunk_bwd_dx_kernel" and first["grid"] == "(768, 16, 1)"
    assert first["metrics"]["Registers Per Thread"] == (168.0, "register/thread")
    assert "Unrelated Metric" not in first["metrics"]
    assert first["metrics"]["stall long_scoreboard"] == (4.5, "")
    means = summary["mean_by_kernel"]
    assert means["_chunk_bwd_dx_kernel"]["Duration"][0] == pytest.approx(1.35)
    assert means["_chunk_bwd_dbdc_kernel"]["Duration"] == (1250.0, "usecond")
    # byte counts in whatever unit ncu chose per launch, read as MB; sectors as millions
    assert first["metrics"]["lts__t_sectors_srcunit_tex_op_write.sum"] == (1.0, "Msector")
    assert means["_chunk_bwd_dx_kernel"]["dram__bytes_read.sum"] == (pytest.approx(11.0), "MB")
    assert ncu_summary.main([str(path), "--json", str(tmp_path / "s.json")]) == 0
    assert "long_scoreboard 4.50" in capsys.readouterr().out
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== ERROR: profiling failed\n")
    assert ncu_summary.main([str(empty)]) == 1


def test_tune_ssd_grid_replaces_only_the_named_options():
    """--grid KERNEL:OPTION=V1,V2;... narrows or widens one kernel's candidates (the other
    options keep their values), 'none' is the compiler's choice, and a bad spec says what is valid."""
    import tune_ssd

    grids = tune_ssd.parse_grid(["bwd_dx:num_warps=4;maxnreg=128,none"])
    cands = tune_ssd.candidates("bwd_dx", grids=grids)
    base = tune_ssd.KERNELS["bwd_dx"][1]
    assert {c["num_warps"] for c in cands} == {4} and {c["maxnreg"] for c in cands} == {128, None}
    assert len(cands) == len(base["num_stages"]) * len(base["BLOCK_N"]) * 2
    assert tune_ssd.candidates("bwd_dbdc", grids=grids) == tune_ssd.candidates("bwd_dbdc")
    with pytest.raises(SystemExit, match="KERNEL one of"):
        tune_ssd.parse_grid(["no_such_kernel:num_warps=4"])
    with pytest.raises(SystemExit, match="integers or 'none'"):
        tune_ssd.parse_grid(["bwd_dx:num_warps=four"])


def test_tune_ssd_runs_each_kernel_in_its_own_form(monkeypatch):
    """A kernel of one form only is vetted and timed with that form forced (the state form, or
    B4's per-head / flat form), whatever the environment says; the per-head B4, which the scan
    runs for fp32 inputs only unless asked, is tuned only when named."""
    import tune_ssd

    monkeypatch.setenv("MATMAMBA_SSD_BWD_DBDC", "flat")
    with tune_ssd.form_of("bwd_dbdc"):
        assert os.environ["MATMAMBA_SSD_BWD_DBDC"] == "head"
    assert os.environ["MATMAMBA_SSD_BWD_DBDC"] == "flat"
    monkeypatch.delenv("MATMAMBA_SSD_BWD_DBDC")
    with tune_ssd.form_of("bwd_dbdc_flat"), tune_ssd.form_of("state_fwd_fused"):
        assert os.environ["MATMAMBA_SSD_BWD_DBDC"] == "flat"
        assert os.environ["MATMAMBA_SSD_STATE"] == "sequential"
    assert not {"MATMAMBA_SSD_BWD_DBDC", "MATMAMBA_SSD_STATE"} & set(os.environ)
    kernels = tune_ssd.parse_args([]).kernels.split(",")
    assert "bwd_dbdc" not in kernels
    assert {"bwd_dx", "bwd_dbdc_flat", "chunk_out_fwd"} <= set(kernels)


@pytest.mark.slow  # ~25 s of offline compiles on 2 cores: run with -m slow
def test_kernel_regs_compiles_the_gated_norms_backward_at_four_programs_an_sm():
    """kernel_regs.py also compiles the conv's and the gated norm's kernels as the block launches
    them. The norm's backward at its default (one row, 8 warps, the two-phase body) fits 4
    programs an SM; the session-11 launch (2 rows, 4 warps, one phase) needs ~255 registers a
    thread and fits only 2, the occupancy ncu measured."""
    import subprocess

    def regs(*extra):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_regs.py"),
                               "--kernels", "rmsnorm_bwd", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = [line.split() for line in proc.stdout.splitlines() if line.startswith("rmsnorm_bwd")]
        assert len(row) == 1, proc.stdout
        return int(row[0][5]), int(row[0][-1])

    default_regs, default_programs = regs()
    assert default_regs <= 96 and default_programs >= 4
    old_regs, old_programs = regs("--const", "RECOMPUTE=0", "--const", "ROWS=2", "--warps", "4")
    assert old_regs > 200 and old_programs <= 2


def test_kernel_regs_compiles_the_backward_for_hopper_with_its_register_cap():
    """scripts/kernel_regs.py compiles B3 and B4 for sm_90a on the CPU (Triton's bundled ptxas) as
    _ssd_backward launches them at p = 24, and the default register cap reaches ptxas: 128
    registers a thread (255 uncapped), 4 programs of B3 an SM; and the forward's K3 at its cap of
    96."""
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_regs.py"), "--kernels",
                           "bwd_dx,bwd_dbdc,chunk_out_fwd", "--headdims", "24", "--sass"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("bwd_dx ", "bwd_dbdc ", "chunk_out_fwd "))}
    assert set(rows) == {"bwd_dx", "bwd_dbdc", "chunk_out_fwd"}, proc.stdout
    assert int(rows["bwd_dx"][5]) <= 128 and int(rows["bwd_dbdc"][5]) <= 128, proc.stdout
    assert int(rows["chunk_out_fwd"][5]) <= 96, proc.stdout
    assert int(rows["bwd_dx"][-1]) == 4, proc.stdout
    # the launch's own shared memory (dynamic, sized by Triton), not only cuobjdump's static part
    assert int(rows["bwd_dx"][7]) >= 8192, proc.stdout
    sass = [line for line in proc.stdout.splitlines() if line.strip().startswith("SASS:")]
    assert len(sass) == 3 and all(int(re.search(r"mma (\d+)", line).group(1)) > 0 for line in sass), proc.stdout


def test_host_profile_says_it_needs_a_gpu():
    """scripts/host_profile.py imports on any machine and says what it needs; on a GPU machine it
    times (docs/performance.md, session 8)."""
    import subprocess

    script = str(ROOT / "scripts" / "host_profile.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, script, "--no-mamba"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                               timeout=120, env=env)
    assert help_text.returncode == 0 and "--shapes" in help_text.stdout and "--blocks" in help_text.stdout


def test_probe_precision_switches_are_set_and_restored():
    """scripts/probe_precision.py's variants flip the two module switches and put them back, also
    when the run raises; without a GPU it says what it needs."""
    import subprocess

    import probe_precision

    from matmamba.ops.ssd import triton_impl
    from matmamba.ops.triton_common import mixer
    before = mixer.SCAN_DY_IN_FP32, triton_impl.STATES_IN_INPUT_DTYPE
    expected = {"default": (False, True), "dy_fp32": (True, True), "states_fp32": (False, False),
                "both": (True, False)}
    for name, switches in expected.items():
        with probe_precision.variant(name):
            assert (mixer.SCAN_DY_IN_FP32, triton_impl.STATES_IN_INPUT_DTYPE) == switches, name
        assert (mixer.SCAN_DY_IN_FP32, triton_impl.STATES_IN_INPUT_DTYPE) == before
    with pytest.raises(RuntimeError), probe_precision.variant("both"):
        raise RuntimeError("a failing run")
    assert (mixer.SCAN_DY_IN_FP32, triton_impl.STATES_IN_INPUT_DTYPE) == before
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_precision.py")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # ~30 s of interpreter: GPU-script plumbing, run with -m slow
def test_gpu_check_draw_repeats_a_stage_exactly(tmp_path):
    """gpu_check draws fresh cotangents each run and prints the draw; --draw N repeats a stage's
    values exactly (so a failing row can be re-run alone), and another draw gives other values."""
    import subprocess

    errors = {}
    for run, draw in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / f"{run}.json"
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-dry-run",
                               "--only", "state_update", "--quick", "--draw", str(draw), "--json", str(out)],
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, TRITON_INTERPRET="1"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"--draw {draw}" in proc.stdout
        report = json.loads(out.read_text())
        assert report["env"]["draw"] == draw
        errors[run] = [row["errors"] for row in report["results"]]
    assert errors["a"] == errors["b"]
    assert errors["a"] != errors["c"]


def test_bench_conv_reads_its_variants_and_names_a_bad_one():
    """scripts/bench_conv.py: BLOCK_LxBLOCK_Dxnum_warps per variant, and a clear error otherwise;
    every variant it times replaces one launch's defaults only."""
    import bench_conv
    from matmamba.ops.conv1d import triton_impl

    assert bench_conv.parse_variant("32x128x4") == dict(BLOCK_L=32, BLOCK_D=128, num_warps=4)
    stepped = bench_conv.parse_variant("32x128x4x2")
    assert stepped == dict(BLOCK_L=32, BLOCK_D=128, num_warps=4, STEPS=2)
    assert bench_conv.launch_options("bwd_dx", stepped) == stepped
    assert bench_conv.launch_options("bwd_du", stepped) is None  # STEPS is pass 2's alone
    for bad in ("32x128", "32x128x4x2x1", "32xbig"):
        with pytest.raises(SystemExit, match="BLOCK_LxBLOCK_Dxnum_warps"):
            bench_conv.parse_variant(bad)
    assert set(bench_conv.KINDS) == set(triton_impl.LAUNCH_DEFAULTS)
    triton_impl.LAUNCH_OVERRIDES["bwd_dx"] = dict(BLOCK_L=16)
    try:
        assert triton_impl._tile("bwd_dx", 1792) == (16, 128, 4)
        du = triton_impl.LAUNCH_DEFAULTS["bwd_du"]  # untouched by bwd_dx's override
        assert triton_impl._tile("bwd_du", 1792) == (du["BLOCK_L"], du["BLOCK_D"], du["num_warps"])
        fwd = triton_impl.LAUNCH_DEFAULTS["fwd"]  # BLOCK_D no wider than the channels:
        assert triton_impl._tile("fwd", 40) == (fwd["BLOCK_L"], 64, fwd["num_warps"])
    finally:
        triton_impl.LAUNCH_OVERRIDES.clear()


def test_gpu_check_names_the_valid_dtypes():
    """gpu_check --dtypes takes our short names and torch's long ones; anything else is an error
    that lists what is valid (it was a bare KeyError)."""
    import gpu_check
    import torch

    assert gpu_check.parse_dtypes("bf16,float32") == [torch.bfloat16, torch.float32]
    assert gpu_check.parse_dtypes("bfloat16") == [torch.bfloat16]
    with pytest.raises(SystemExit, match="unknown dtype.*'fp64'.*valid: bf16, bfloat16"):
        gpu_check.parse_dtypes("fp16,fp64")


def test_gpu_check_refuses_no_one_head_draws():
    """--one-head-draws 0 would judge the one-head rows on no draws at all: an error that says so."""
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-dry-run",
                           "--one-head-draws", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--one-head-draws must be at least 1; got 0" in proc.stderr


def test_bench_block_times_fla_backward_past_its_triton_refusal(monkeypatch):
    """fla refuses its gated backward on Hopper with Triton < 3.7.1: bench_block times it with the
    refusal lifted (and restored after), says so in the row's note, and gives up on other errors."""
    import types

    import bench_block

    chunk_o = types.ModuleType("fla.ops.common.chunk_o")
    chunk_o.TRITON_ABOVE_3_7_1 = False
    for name in ("fla", "fla.ops", "fla.ops.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o", chunk_o)
    calls = []

    def fake_fla(q, k, v, g, scale):
        calls.append(chunk_o.TRITON_ABOVE_3_7_1)
        out = (q * k).sum(-1, keepdim=True) * v * g[..., None].exp()

        class Guarded(torch.autograd.Function):  # fla raises in its backward, as chunk_bwd_dqkwg does
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, grad):
                if not chunk_o.TRITON_ABOVE_3_7_1:
                    raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")
                return grad
        return Guarded.apply(out), None

    monkeypatch.setattr(bench_block, "bench", lambda fn, **kw: (fn(), dict(ms=2.0, spread=0.0))[1])
    monkeypatch.setattr(bench_block, "RESULTS", [dict(case="ssd fwd+bwd", shape="b1 l8 h2 p3 n4 Q64",
                                                      ours_ms=1.0, ours_spread=0.0)])
    monkeypatch.setattr(bench_block, "META", {})
    inputs = (torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 3),
              -torch.rand(1, 8, 2))
    bench_block.fla_fwdbwd(fake_fla, "b1 l8 h2 p3 n4", inputs)
    row = bench_block.RESULTS[-1]
    assert row["case"] == "fla chunk_simple_gla fwd+bwd" and row["speedup"] == 2.0
    assert "refusal lifted" in row["note"] and "b1 l8 h2 p3 n4" in bench_block.META["fla_fwdbwd_guard_lifted"]
    assert calls == [False, True] and chunk_o.TRITON_ABOVE_3_7_1 is False  # restored

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources")
    bench_block.fla_fwdbwd(broken, "b1 l8 h2 p3 n4", inputs)
    assert len(bench_block.RESULTS) == 2 and "out of resources" in bench_block.META["fla_fwdbwd_refused"]["b1 l8 h2 p3 n4"]


def test_step_aten_ops_lists_the_ops_around_the_kernels():
    """scripts/step_aten_ops.py on a small block: the training step's GEMMs, autocast's casts and
    the gradients' accumulation, every Triton kernel once in order (recorded, not run), and no
    copy or concatenation of activations around the kernels."""
    import step_aten_ops

    from matmamba import MatMamba2

    kernels_in_order = ["_conv_fwd_kernel", "_cb_kernel", "_state_walk_kernel", "_chunk_out_fwd_kernel",
                        "_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel", "_state_walk_kernel",
                        "_chunk_bwd_dx_kernel", "_chunk_bwd_dbdc_flat_kernel", "_finalize_grads_kernel",
                        "_conv_bwd_du_kernel", "_conv_bwd_dx_kernel", "_conv_wgrad_sum_kernel"]
    sizes = MatMamba2(96, d_state=16, headdim=8, layer_idx=0)  # read for its in_proj rows per width
    for width in (96, 48):
        ops, kernels = step_aten_ops.record_step(96, batch=2, seqlen=40, width=width, d_state=16, headdim=8)
        names = [name for name, _, _ in ops]
        assert kernels == kernels_in_order
        assert names.count("mm") == 6  # in_proj and out_proj: forward, input and weight gradients
        assert not {"cat", "clone", "copy_", "contiguous"} & set(names), names
        # forward: u and the two weights' rows / columns to bf16; backward: their gradients to fp32
        in_rows = (sizes._in_proj_rows(sizes.heads_for_width(width)), 96)
        out_cols = (96, 2 * width)
        casts = sorted(inputs[0] for name, inputs, _ in ops if name == "_to_copy")
        assert casts == sorted((s, dtype) for s in ((2, 40, 96), in_rows, out_cols)
                               for dtype in ("float32", "bfloat16"))
        assert names.count("add_") == 9  # into the existing .grad of u and the eight parameters
    out = step_aten_ops.main(["--d-model", "96", "--b", "1", "--l", "16"])
    assert out["kernels"] == kernels_in_order and out["counts"]["mm"] == 6
