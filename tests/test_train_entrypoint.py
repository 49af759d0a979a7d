"""train.py as users run it: the default command's output, a multirun of two jobs, W&B offline."""

import json
import time

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
    assert len(records) == 1
    # wandb's service process writes the history file asynchronously, even after finish()
    deadline = time.monotonic() + 30
    while records[0].stat().st_size < 1000 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert records[0].stat().st_size >= 1000  # the run's logged history and config


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


def test_failed_run_still_closes_the_loggers(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # the data has 10 classes: fails in on_fit_start, after the loggers have started
    cfg = compose_cfg(["logger=many", *FAST, *DIGITS_TINY, "++model.overrides.n_classes=7"], tmp_path)
    with pytest.raises(ValueError, match="n_classes=7"):
        train(cfg)
    assert wandb.run is None  # finished, not left dangling for the next job
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_validate_only_from_a_checkpoint(tmp_path):
    trained = tmp_path / "trained"
    base = [*FAST, *DIGITS_TINY, "final_eval=last"]
    first = train(compose_cfg(base, trained))
    again = train(compose_cfg([*base, "train=false", f"ckpt_path={trained}/checkpoints/last.ckpt"], tmp_path / "eval"))
    for w in (64, 32, 16, 8):
        assert again[f"val/acc@{w}"] == pytest.approx(first[f"val/acc@{w}"])
        assert again[f"val/loss@{w}"] == pytest.approx(first[f"val/loss@{w}"], rel=1e-5)


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    cfg = compose_cfg([*FAST, *DIGITS_TINY, "model.compile=true", "trainer.max_steps=2"], tmp_path)
    metrics = train(cfg)
    assert all(metrics[f"val/loss@{w}"] > 0 for w in (64, 32, 16, 8))


def test_wandb_runs_are_grouped_by_experiment_and_multirun(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from matmamba.training.utils import instantiate_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    single = instantiate_loggers(compose_cfg(["logger=wandb", "experiment=lm_pydoc"], tmp_path).logger)
    assert single[0]._wandb_init["group"] == "lm_pydoc"
    cfg = compose_cfg(["logger=wandb", "hparams_search=digits_lr"], tmp_path)
    sweep_name = HydraConfig.get().sweep.dir.split("/")[-1]
    grouped = instantiate_loggers(cfg.logger)
    assert grouped[0]._wandb_init["group"] == f"digits-{sweep_name}"
    assert grouped[0]._wandb_init["tags"] == ["digits", "vision"]
