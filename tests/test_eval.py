"""eval.py end to end on a tiny model trained for a few steps with the real Lightning module and
the bundled digits: the written sweep, metrics, export under a budget, published checkpoints,
errors, Hydra multirun, W&B."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import matmamba
from matmamba.evaluation import BudgetError, CheckpointError, EvalConfigError, SweepError, run_eval
from matmamba.evaluation.loading import load_lightning_checkpoint
from matmamba.evaluation.report import columns
from matmamba.training import VisionClassificationModule
from matmamba.training.data import DigitsDataModule, PydocDataModule

ROOT = Path(__file__).resolve().parents[1]
# vision_tiny reshaped for the 8x8 grayscale digits: d_model 64, 2 layers, valid widths 4, 8, ..., 64
DIGITS_TINY = dict(image_size=8, patch_size=2, in_chans=1)
TRAINED = [64, 32, 16, 8]
FAST = ["latency.warmup=1", "latency.repeats=2", "latency.batch_size=8", "print_table=false"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one thread is faster than two fighting over small kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eval_config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"paths.output_dir={tmp_path}", f"paths.work_dir={tmp_path}",
                                          *FAST, *overrides])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def digits_val(batch_size=512):
    data = DigitsDataModule(batch_size=32, val_batch_size=batch_size)
    data.setup("validate")
    images, labels = next(iter(data.val_dataloader()))
    return images, labels


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A training run folder: <run>/checkpoints/last.ckpt from 3 optimizer steps of the real module."""
    torch.manual_seed(0)
    module = VisionClassificationModule("vision_tiny", overrides=DIGITS_TINY, widths=TRAINED,
                                        optim=dict(lr=3e-3, warmup_steps=0), top_k=[1])
    data = DigitsDataModule(batch_size=32, val_batch_size=128)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    run = tmp_path_factory.mktemp("train_run")
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


def test_sweep_writes_csv_json_png_one_row_per_configuration(trained_run, tmp_path):
    record = run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", "sweep=mixnmatch", "sweep.random=3",
                                  "sweep.choices=valid"))
    # 4 trained widths + 12 published mixes (ordered pairs, k = 1 of 2 layers) + 3 random ones
    rows = read_csv(tmp_path / "sweep.csv")
    assert len(rows) == len(record["configurations"]) == 19
    assert list(rows[0]) == columns(["top1", "top5", "loss"])
    assert [r["kind"] for r in rows].count("trained") == 4
    assert [r["kind"] for r in rows].count("mix") == 12 and [r["kind"] for r in rows].count("random") == 3
    assert len({r["widths"] for r in rows}) == 19
    assert [int(r["width"]) for r in rows if r["trained"] == "True"] == TRAINED
    assert all(float(r["latency_ms"]) > 0 and r["latency_batch"] == "8" for r in rows)

    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["metric"] == "top1" and saved["maximize"] is True
    assert [c["name"] for c in saved["configurations"]] == [r["name"] for r in rows]
    assert saved["data"]["_target_"].endswith("DigitsDataModule")  # the data came from the checkpoint

    # Frontier: the cheapest configuration and the most accurate one are on it, nothing dominates it.
    table = saved["configurations"]
    front = [c for c in table if c["pareto_params"]]
    assert min(table, key=lambda c: c["params"])["pareto_params"]
    assert max(c["top1"] for c in front) == max(c["top1"] for c in table)
    for c in front:
        assert not any(o["params"] <= c["params"] and o["top1"] > c["top1"] for o in table)

    import matplotlib.pyplot as plt
    image = plt.imread(tmp_path / "pareto.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 800  # two panels


def test_metrics_are_those_of_the_model_on_the_validation_set(trained_run, tmp_path):
    record = run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", "batch_size=100", "latency.enabled=false"))
    model = load_lightning_checkpoint(trained_run).model
    images, labels = digits_val()
    assert len(labels) == 360
    for row in record["configurations"]:
        with torch.no_grad():
            logits = model(images, width=row["width"])
        assert row["top1"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item(), abs=1e-6)
        top5 = (logits.topk(5, -1).indices == labels[:, None]).any(-1).float().mean().item()
        assert row["top5"] == pytest.approx(top5, abs=1e-6)
        assert row["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert row["latency_ms"] is None and row["pareto_latency"] is None


def test_budget_exports_the_best_submodel_as_a_plain_model(trained_run, tmp_path):
    nested = load_lightning_checkpoint(trained_run).model
    budget = nested.num_params(40) + 1  # uniform widths up to 40 fit
    export = tmp_path / "sub"
    record = run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}/checkpoints/last.ckpt", "sweep=uniform",
                                  f"budget.params={budget}", f"export_dir={export}"))
    rows = record["configurations"]
    assert len(rows) == 16  # every multiple of 4 up to 64
    fitting = [r for r in rows if r["params"] <= budget]
    best = max(fitting, key=lambda r: r["top1"])
    selected = record["selected"]
    assert selected["top1"] == best["top1"] and selected["params"] <= budget
    assert json.loads((tmp_path / "sweep.json").read_text())["selected"]["name"] == selected["name"]

    dense = matmamba.load_model(export)
    assert type(dense) is matmamba.MatMamba2Vision and dense.config.widths == []
    assert sum(p.numel() for p in dense.parameters()) == selected["params"]
    assert dense.num_params(non_embedding=True) == selected["params_non_embedding"]
    images, _ = digits_val(64)
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(images), nested(images, width=selected["width"]))
    assert json.loads((export / "export.json").read_text())["widths"] == selected["widths"]


def test_a_per_layer_mix_exports_exactly(trained_run, tmp_path):
    export = tmp_path / "mix"
    record = run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", "width=[48,12]", f"export_dir={export}",
                                  "latency.enabled=false"))
    (row,) = record["configurations"]
    assert row["name"] == "48x1+12x1" and row["kind"] == "list"
    dense = matmamba.load_model(export).eval()
    assert dense.config.layer_nheads == [12, 3]  # expand 2 * width / headdim 8
    assert sum(p.numel() for p in dense.parameters()) == row["params"]
    nested = load_lightning_checkpoint(trained_run).model
    images, _ = digits_val(64)
    with torch.no_grad():
        torch.testing.assert_close(dense(images), nested(images, width=[48, 12]))

    # The export sweeps like any model; its own configuration is its "trained" one.
    again = run_eval(eval_config(tmp_path / "again", f"pretrained={export}", "data=digits", "sweep=uniform",
                                 "latency.enabled=false"))
    rows = again["configurations"]
    assert (rows[0]["name"], rows[0]["trained"], rows[0]["params"]) == ("48x1+12x1", True, row["params"])
    assert rows[0]["top1"] == pytest.approx(row["top1"], abs=1e-6)
    assert [r["width"] for r in rows[1:]] == [12, 8, 4]  # uniform widths must fit the narrowest layer


def test_published_layout_checkpoint_evaluates(tmp_path):
    torch.manual_seed(3)
    model = matmamba.create_model("vision_tiny", **DIGITS_TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    published = tmp_path / "published"
    published.mkdir()
    state = model.published_state_dict()
    # the published in_proj rows: z, x (2 * d_inner), B, C (2 * d_state), dt (heads)
    assert state["layers.0.mixer.in_proj.weight"].shape[0] == 2 * 128 + 2 * 16 + 16
    torch.save(state, published / "pytorch_model.bin")
    c = model.config
    (published / "config.json").write_text(json.dumps({  # a published-style config: no model_type
        "d_model": c.d_model, "n_layer": c.n_layer, "n_classes": c.n_classes, "image_size": c.image_size,
        "patch_size": c.patch_size, "in_chans": c.in_chans, "chunk_size": c.chunk_size,
        "ssm_cfg": {"d_state": c.d_state, "headdim": c.headdim}}))

    out = tmp_path / "eval"
    record = run_eval(eval_config(out, f"pretrained={published}", "experiment=digits", "latency.enabled=false"))
    assert record["model"]["type"] == "vision"
    assert [r["width"] for r in record["configurations"]] == TRAINED  # D, D/2, D/4, D/8
    images, labels = digits_val()
    for row in record["configurations"]:
        with torch.no_grad():
            acc = (model(images, width=row["width"]).argmax(-1) == labels).float().mean().item()
        assert row["top1"] == pytest.approx(acc, abs=1e-6)
    assert (out / "sweep.csv").is_file()


def test_language_model_metrics(tmp_path):
    torch.manual_seed(4)
    model = matmamba.create_model("lm_tiny").eval()
    model.save_pretrained(tmp_path / "lm")
    record = run_eval(eval_config(tmp_path, f"pretrained={tmp_path / 'lm'}", "data=pydoc", "data.seq_len=32",
                                  "batch_size=4", "limit_batches=2", "sweep=list", "sweep.configs=[64,[32,16]]"))
    assert record["metric"] == "bpb" and record["maximize"] is False and record["flops_per"] == "token"
    data = PydocDataModule(batch_size=4, val_batch_size=4, seq_len=32)
    data.setup("validate")
    batches = [b for _, b in zip(range(2), data.val_dataloader())]
    for row, width in zip(record["configurations"], [64, [32, 16]]):
        with torch.no_grad():
            losses = [F.cross_entropy(model(t[:, :-1], width=width).logits.flatten(0, 1), t[:, 1:].flatten(),
                                      reduction="sum") for t in batches]
        loss = sum(losses).item() / sum(t[:, 1:].numel() for t in batches)
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert row["bpb"] == pytest.approx(loss / math.log(2), rel=1e-5)  # one byte per token
        assert row["flops"] == model.flops_per_token(width)


def test_missing_and_corrupt_checkpoints_fail_clearly(trained_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run_eval(eval_config(tmp_path, f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_eval(eval_config(tmp_path, f"ckpt_path={tmp_path}"))
    for i in range(3):  # random bytes fail in different ways inside the unpickler
        garbage = tmp_path / f"garbage{i}.ckpt"
        garbage.write_bytes(os.urandom(4096))
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            run_eval(eval_config(tmp_path, f"ckpt_path={garbage}"))
    whole = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_eval(eval_config(tmp_path, f"ckpt_path={truncated}"))

    exported = tmp_path / "exported"
    matmamba.create_model("vision_tiny", **DIGITS_TINY).save_pretrained(exported)
    with pytest.raises(CheckpointError, match="pretrained="):  # a save_pretrained folder given as ckpt_path
        run_eval(eval_config(tmp_path, f"ckpt_path={exported}"))
    weights = exported / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_eval(eval_config(tmp_path, f"pretrained={exported}", "data=digits"))
    with pytest.raises(CheckpointError, match="does not exist"):
        run_eval(eval_config(tmp_path, f"pretrained={tmp_path / 'missing'}", "data=digits"))


def test_impossible_budget_and_bad_settings_fail_clearly(trained_run, tmp_path):
    with pytest.raises(BudgetError, match=r"smallest configuration found is 8 with params = [\d,]+"):
        run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", "budget.params=1000", "latency.enabled=false"))
    assert len(read_csv(tmp_path / "sweep.csv")) == 4  # the measured sweep is kept
    with pytest.raises(SweepError, match="invalid width 6 .*Valid widths: multiples of 4"):
        run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", "width=6"))
    with pytest.raises(EvalConfigError, match="exactly one of ckpt_path"):
        run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", f"pretrained={tmp_path}"))
    with pytest.raises(EvalConfigError, match="export_dir needs a budget"):
        run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", f"export_dir={tmp_path / 'x'}"))


def test_cli_multirun_over_width_and_clear_error(trained_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep_dir = tmp_path / "multi"
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "-m", f"ckpt_path={trained_run}", "width=64,16",
                           "latency.enabled=false", "plot=false", f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [[r["width"] for r in read_csv(job / "sweep.csv")] for job in jobs] == [["64"], ["16"]]

    failed = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt_path={tmp_path / 'none.ckpt'}",
                             f"hydra.run.dir={tmp_path / 'err'}"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert failed.returncode == 1
    output = failed.stdout + failed.stderr
    assert "CheckpointError: ckpt_path=" in output and "does not exist" in output and "Traceback" not in output


def test_wandb_gets_the_table_and_the_plot(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_eval(eval_config(tmp_path, f"ckpt_path={trained_run}", "logger=wandb", "limit_batches=1"))
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = run.glob("files/media/table/eval/sweep_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:3] == ["name", "kind", "trained"] and len(logged["data"]) == 4
    assert list(run.glob("files/media/images/eval/pareto_*.png"))
