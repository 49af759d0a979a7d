"""train.py as users run it: the default command's output, a multirun of two jobs, W&B offline."""

import json

import pytest
from training_helpers import FAST, TINY_VISION, compose_cfg, one_thread, run_train_script

from matmamba.training.pipeline import train

DIGITS_TINY = TINY_VISION + [
    "++model.overrides.image_size=8", "++model.overrides.patch_size=2", "++model.overrides.in_chans=1",
    "++model.overrides.chunk_size=17", "data.batch_size=16",
]
QUIET = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "optim.warmup_steps=1", "extras.print_config=false", "trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_train_script_runs_and_reports(tmp_path):
    out = tmp_path / "run"
    result = run_train_script([*QUIET, *DIGITS_TINY, f"hydra.run.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation per width" in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["experiment"] == "digits" and report["optimized_metric"] == "val/acc"
    assert set(report["per_width"]) == {"64", "32", "16", "8"}
    assert (out / "checkpoints" / "last.ckpt").is_file() and report["best_ckpt"]
    assert (out / "model" / "config.json").is_file()  # save_pretrained export
    assert (out / "csv" / "metrics.csv").is_file() and (out / "train.log").is_file()


def test_multirun_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train_script(
        ["-m", *QUIET, *DIGITS_TINY, "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert all(r["global_step"] == 2 for r in reports)
    overrides = [(sweep / str(job) / ".hydra" / "overrides.yaml").read_text() for job in (0, 1)]
    assert "optim.lr=0.001" in overrides[0] and "optim.lr=0.003" in overrides[1]


def test_wandb_offline_writes_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_cfg(["logger=wandb", *FAST, *DIGITS_TINY, "trainer.max_steps=2"], tmp_path)
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 1000  # the run's logged history


def test_wandb_without_login_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    from matmamba.training import utils

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(utils, "wandb_logged_in", lambda: False)
    cfg = compose_cfg(["logger=wandb", *FAST], tmp_path)
    with caplog.at_level("WARNING"):
        loggers = utils.instantiate_loggers(cfg.logger)
    assert "no login found" in caplog.text and "offline" in caplog.text
    assert loggers[0]._offline is True
    utils.close_loggers(loggers, "success")
