"""Bad configs and missing data fail up front with messages that say what is valid."""

import pytest
from training_helpers import FAST, TINY_LM, TINY_VISION, compose_cfg, one_thread, run_train_script

from matmamba.training import pipeline
from matmamba.training.data import DataConfigError
from matmamba.training.pipeline import build, metric_value, train
from matmamba.training.utils import ConfigError

DIGITS_TINY = TINY_VISION + ["++model.overrides.image_size=8", "++model.overrides.patch_size=2",
                             "++model.overrides.in_chans=1", "++model.overrides.chunk_size=17"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_steps=-1"], "trainer.max_steps must be a positive integer"),
        (["trainer.precision=16-mixed"], "trainer.precision='16-mixed' is not supported; valid: auto"),
        (["model.widths=[128,128]"], "model.widths has duplicates"),
        (["model.widths=[]"], "model.widths must be null or a non-empty list"),
        (["model.width_weights=[1,1]"], "model.width_weights has 2 entries for 4 widths"),
        (["model.widths_per_step=5"], r"model.widths_per_step must be null or an integer in \[1, number of widths\]"),
        (["model.distill.weight=1.5"], r"model.distill.weight must be in \[0, 1\]"),
        (["optim.lr=-1"], "optim.lr must be a positive number"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
        (["optim.warmup_steps=5000"], "optim.warmup_steps=5000 must be below the schedule's"),
        (["data=pydoc"], "is lm data but model 'VisionClassificationModule' trains a vision model"),
        (["optimized_mode=biggest"], "optimized_mode must be 'min' or 'max'"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt does not exist"),
        (["data.batch_size=0"], "data.batch_size must be a positive integer"),
        (["model.compile=fast"], "model.compile must be true, false or a torch.compile mode .default, reduce-overhead"),
    ],
)
def test_bad_config_values(overrides, message, tmp_path):
    cfg = compose_cfg([*FAST, *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        build(cfg)


def test_several_problems_are_reported_together(tmp_path):
    cfg = compose_cfg([*FAST, "optim.lr=0", "trainer.max_steps=0"], tmp_path)
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert "optim.lr" in str(err.value) and "trainer.max_steps" in str(err.value)


def test_width_not_valid_for_the_model_lists_valid_widths(tmp_path):
    cfg = compose_cfg([*FAST, *DIGITS_TINY, "model.widths=[64,30]"], tmp_path)
    expected = r"could not build the model vision_digits: invalid width 30 .*Valid widths: multiples of 4"
    with pytest.raises(ValueError, match=expected):
        build(cfg)


def test_unknown_model_override(tmp_path):
    cfg = compose_cfg([*FAST, "++model.overrides.n_layers=3"], tmp_path)
    with pytest.raises(ValueError, match="unknown config fields"):
        build(cfg)


def test_data_and_model_shape_mismatch(tmp_path):
    cfg = compose_cfg([*FAST, *DIGITS_TINY, "++model.overrides.n_classes=7"], tmp_path)
    with pytest.raises(ValueError, match="the data has 10 classes but the model has n_classes=7"):
        train(cfg)


def test_missing_token_shards_fail_at_start_with_the_command(tmp_path):
    cfg = compose_cfg(["experiment=lm_130m", "trainer=cpu", *FAST, *TINY_LM, f"data.root={tmp_path}/none"], tmp_path)
    command = (r"Prepare them with:\n    python scripts/prepare_fineweb.py "
               r"--dataset HuggingFaceFW/fineweb --subset sample-10BT --tokenizer gpt2 --out ")
    with pytest.raises(DataConfigError, match=command):
        train(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "token shards not found"),
        (["trainer.devices=3", "+trainer.strategy=ddp"],
         r"data.batch_size=512 must be a multiple of data.micro_batch_size \* devices = 32 \* 3 = 96"),
    ],
)
def test_data_errors_come_before_the_other_ranks_start(overrides, message, tmp_path, monkeypatch):
    """With several devices, fit launches the other ranks: missing data or a batch that does not
    split over the devices must be reported before, in the launching process, not once a rank or
    as rank 0's error among the others' failed collectives."""
    import lightning as L

    def launched(*args, **kwargs):
        raise AssertionError("Trainer.fit was reached with a data error")

    monkeypatch.setattr(L.Trainer, "fit", launched)
    closed = []  # the loggers are still closed, as failed (a W&B run is not left running)
    monkeypatch.setattr(pipeline, "close_loggers", lambda loggers, status: closed.append(status))
    cfg = compose_cfg(["experiment=lm_130m", *FAST, *TINY_LM, f"data.root={tmp_path}/none", *overrides], tmp_path)
    with pytest.raises(DataConfigError, match=message):
        train(cfg)
    assert closed == ["failed"]


def test_validate_only_run_needs_only_the_validation_split(tmp_path, monkeypatch):
    """train=false: the check before fit does not ask for the training images."""
    import lightning as L

    (tmp_path / "imagenet" / "val" / "n01440764").mkdir(parents=True)
    monkeypatch.setattr(L.Trainer, "validate", lambda *args, **kwargs: [])
    overrides = ["experiment=vision_b16", "trainer=cpu", *FAST, *TINY_VISION, f"data.root={tmp_path}/imagenet",
                 "train=false"]
    assert train(compose_cfg(overrides, tmp_path)) == {}


def test_missing_imagenet_fails_at_start(tmp_path):
    overrides = ["experiment=vision_b16", "trainer=cpu", *FAST, *TINY_VISION, f"data.root={tmp_path}/none"]
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(DataConfigError, match="ImageNet not found"):
        train(cfg)


def test_unlogged_optimized_metric():
    with pytest.raises(KeyError, match="optimized_metric='val/nope' was not logged; logged metrics: val/acc"):
        metric_value({"val/acc": 1.0, "train/loss": 2.0}, "val/nope")


def test_script_reports_bad_override_and_exits_nonzero(tmp_path):
    result = run_train_script(["optim.lr=-3", "extras.print_config=false", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode != 0
    assert "optim.lr must be a positive number" in result.stderr


def test_compile_mode_by_name_reaches_torch_compile(tmp_path, monkeypatch):
    """model.compile=<mode> compiles the network with that torch.compile mode; true with the default."""
    seen = []
    for setting, expected in (("reduce-overhead", "reduce-overhead"), ("true", None)):
        cfg = compose_cfg([*FAST, *DIGITS_TINY, f"model.compile={setting}"], tmp_path / setting)
        _, module, _, _ = build(cfg)
        monkeypatch.setattr(module.net, "compile", lambda mode=None, **kw: seen.append(mode))
        module.configure_model()
        assert seen[-1] == expected
