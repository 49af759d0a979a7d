"""Every experiment composes, instantiates, and trains a few steps with a tiny model on tiny data
of its real format (digits, pydoc text, a JPEG ImageFolder tree, token shards)."""

import json

import pytest
import torch
from hydra.utils import get_class, instantiate
from training_helpers import (
    EXPERIMENTS,
    FAST,
    LM_RECIPES,
    TINY_LM,
    TINY_VISION,
    VISION_RECIPES,
    compose_cfg,
    make_image_folder,
    make_token_shards,
    one_thread,
)

from matmamba.training.pipeline import build, train

EXPECTED = {"digits", "lm_pydoc", "vision_35m", "vision_135m", "vision_b16", "lm_130m", "lm_370m", "lm_790m", "lm_1_4b"}

# DESIGN §4 recipe values: (d_model, n_layer, global batch, lr, warmup, steps)
VISION_TABLE = {
    "vision_35m": (512, 20, 8192, 5e-3, 10_000, 124_800),
    "vision_135m": (1024, 20, 4096, 5e-3, 10_000, 249_600),
    "vision_b16": (768, 24, 4096, 3e-3, 0, 31_200),
}
LM_SHAPES = {"lm_130m": (768, 24), "lm_370m": (1024, 48), "lm_790m": (1536, 48), "lm_1_4b": (2048, 48)}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3, per_class=4, size=40)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    return make_token_shards(tmp_path_factory.mktemp("fineweb") / "shards", val_tokens=1500, max_tokens=8000)


def tiny_overrides(experiment, image_root, shard_root):
    """Overrides that keep an experiment's recipe but shrink its model and point it at tiny data."""
    if experiment in VISION_RECIPES:
        return TINY_VISION + [
            f"data.root={image_root}", "data.image_size=32", "++model.overrides.image_size=32",
            "++model.overrides.patch_size=8", "++model.overrides.n_classes=3", "data.batch_size=4",
            "data.micro_batch_size=null", "data.num_workers=0", "model.top_k=[1,2]",
        ]
    if experiment in LM_RECIPES:
        return TINY_LM + [f"data.root={shard_root}", "data.seq_len=32", "data.batch_size=4", "data.micro_batch_size=null",
                          "data.num_workers=0"]
    if experiment == "lm_pydoc":
        return TINY_LM + ["data.seq_len=32", "data.batch_size=4"]
    return TINY_VISION + ["++model.overrides.image_size=8", "++model.overrides.patch_size=2",
                          "++model.overrides.in_chans=1", "++model.overrides.chunk_size=17", "data.batch_size=16",
                          "data.micro_batch_size=null"]


def test_all_experiments_exist():
    assert EXPECTED <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_experiment_composes_with_recipe_values(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.name == experiment
    if experiment in VISION_TABLE:
        d, layers, batch, lr, warmup, steps = VISION_TABLE[experiment]
        recipe = (cfg.data.batch_size, cfg.optim.lr, cfg.optim.warmup_steps, cfg.trainer.max_steps)
        assert recipe == (batch, lr, warmup, steps)
        assert cfg.optim.weight_decay == 0.1 and list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.grad_clip == 1.0
        assert cfg.model.overrides.drop_path_rate == 0.1 and cfg.model.label_smoothing == 0.1
        assert cfg.model.mixup.mixup_alpha == 0.8 and cfg.model.mixup.cutmix_alpha == 1.0
        assert cfg.data.auto_augment == "rand-m9-mstd0.5" and cfg.data.re_prob == 0.25
        assert cfg.trainer.devices == 8 and cfg.trainer.precision == "bf16-mixed"
    if experiment in LM_SHAPES:
        assert cfg.data.seq_len == 1024 and cfg.data.batch_size * cfg.data.seq_len == 512 * 1024
        assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.1
    if experiment == "lm_130m":
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.trainer.max_steps) == (6e-4, 700, 30_000)
    if experiment in ("lm_790m", "lm_1_4b"):
        assert cfg.trainer.strategy._target_.endswith("fsdp_strategy")


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_experiment_instantiates_full_size_model_shapes(experiment):
    """The recipe's real model config (not built: the largest have 1.4B parameters)."""
    from matmamba import model_config

    cfg = compose_cfg([f"experiment={experiment}"])
    config = model_config(cfg.model.name, **cfg.model.overrides)
    if experiment in VISION_TABLE:
        assert (config.d_model, config.n_layer) == VISION_TABLE[experiment][:2]
        assert config.patch_size == 16 and config.image_size == 224 and config.head_bias_init == -6.9
    if experiment in LM_SHAPES:
        assert (config.d_model, config.n_layer) == LM_SHAPES[experiment]
        d = config.d_model
        assert list(config.widths) == [d, d // 2, d // 4, d // 8]
    if "strategy" in cfg.trainer:
        strategy = instantiate(cfg.trainer.strategy)
        assert strategy is not None


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_experiment_trains_a_few_steps(experiment, image_root, shard_root, tmp_path):
    overrides = [f"experiment={experiment}", *FAST, *tiny_overrides(experiment, image_root, shard_root)]
    cfg = compose_cfg(overrides, tmp_path)
    metrics = train(cfg)
    report = json.loads((tmp_path / "metrics.json").read_text())
    widths = report["widths"]
    assert widths == sorted(widths, reverse=True) and len(widths) == 4
    for w in widths:
        assert torch.isfinite(torch.tensor(metrics[f"val/loss@{w}"]))
        assert set(report["per_width"][str(w)]) >= ({"loss", "acc"} if report["task"] == "vision" else {"loss", "ppl"})
    if experiment in VISION_RECIPES:
        assert "acc2" in report["per_width"][str(widths[0])]  # top-k beyond 1
    assert report["global_step"] == 4
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    meta = ckpt["matmamba"]
    assert meta["model_name"] == cfg.model.name and meta["widths"] == widths
    assert meta["model_type"] == ("vision" if experiment.startswith(("vision", "digits")) else "lm")
    assert meta["model_config"]["d_model"] == 64
    assert get_class(meta["data"]["_target_"]) is get_class(cfg.data._target_)
    rebuilt = instantiate(meta["data"])  # what eval does with it
    assert rebuilt.hparams == ckpt["datamodule_hyper_parameters"]


def test_build_gives_matching_components(tmp_path):
    cfg = compose_cfg(["experiment=lm_pydoc", *FAST, *TINY_LM], tmp_path)
    datamodule, module, trainer, loggers = build(cfg)
    assert module.task == datamodule.task == "lm"
    assert module.widths == [64, 32, 16, 8] and trainer.max_steps == 4
    assert [type(logger).__name__ for logger in loggers] == ["CSVLogger"]
