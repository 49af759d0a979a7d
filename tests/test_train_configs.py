"""Every option of every config group composes; the debug presets, loggers and the sweep config work."""

import json

import pytest
from hydra.utils import instantiate
from training_helpers import CONF, TINY_VISION, compose_cfg, one_thread

from matmamba.training.pipeline import build, train

GROUPS = ["data", "model", "optim", "trainer", "logger", "callbacks", "paths", "extras", "hydra", "debug",
          "hparams_search", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
DIGITS_TINY = TINY_VISION + ["++model.overrides.image_size=8", "++model.overrides.patch_size=2",
                             "++model.overrides.in_chans=1", "++model.overrides.chunk_size=17", "data.batch_size=16"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_groups_have_the_expected_options():
    names = {(g, o) for g, o in OPTIONS}
    for trainer in ("default", "cpu", "gpu", "ddp", "fsdp"):
        assert ("trainer", trainer) in names
    for logger in ("csv", "tensorboard", "wandb", "many"):
        assert ("logger", logger) in names
    for debug in ("default", "fdr", "limit", "profiler"):
        assert ("debug", debug) in names
    assert (CONF / "local" / ".gitkeep").is_file()


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes(group, option, tmp_path):
    if group in ("paths", "extras", "hydra", "optim"):
        overrides = [f"{group}={option}"]
    elif group == "data" and option in ("pydoc", "fineweb"):
        overrides = [f"{group}={option}", "model=lm_pydoc"]
    elif group == "model" and option.startswith("lm_"):
        overrides = [f"{group}={option}", "data=pydoc"]
    else:
        overrides = [f"{group}={option}"]
    cfg = compose_cfg(overrides, tmp_path)
    assert cfg.data._target_ and cfg.model._target_ and cfg.trainer._target_
    if group == "trainer" and "strategy" in cfg.trainer:
        assert instantiate(cfg.trainer.strategy) is not None


def test_sweep_config_is_a_multirun():
    cfg = compose_cfg(["hparams_search=digits_lr"])
    assert cfg.optimized_metric == "val/acc"
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    assert str(hydra_cfg.mode) == "RunMode.MULTIRUN"
    assert dict(hydra_cfg.sweeper.params) == {"optim.lr": "1.0e-3,3.0e-3", "optim.weight_decay": "0.0,0.05"}


def test_fast_dev_run_preset(tmp_path):
    cfg = compose_cfg(["debug=fdr", *DIGITS_TINY, "extras.print_config=false"], tmp_path)
    metrics = train(cfg)
    assert {"val/acc@64", "val/acc@8"} <= set(metrics)
    assert not list(tmp_path.rglob("*.ckpt"))  # fast_dev_run writes no checkpoints


def test_limit_preset_with_tensorboard_and_csv(tmp_path):
    pytest.importorskip("tensorboard")  # in the [dev] extra
    cfg = compose_cfg(["debug=limit", "logger=many", "logger.wandb.offline=true", *DIGITS_TINY,
                       "extras.print_config=false", "trainer.detect_anomaly=false"], tmp_path)
    _, _, trainer, loggers = build(cfg)
    assert trainer.max_steps == 6 and [type(x).__name__ for x in loggers] == ["CSVLogger", "TensorBoardLogger",
                                                                            "WandbLogger"]
    for logger in loggers:
        logger.finalize("success")
    cfg = compose_cfg(["debug=limit", "logger=tensorboard", *DIGITS_TINY, "extras.print_config=false",
                       "trainer.detect_anomaly=false"], tmp_path)
    train(cfg)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 6
