"""The pieces of the training module: parameter groups, schedule, width sampling, per-width
backward, distillation, atomic checkpoints, throughput."""


import pytest
import torch
from training_helpers import FAST, TINY_VISION, compose_cfg, one_thread

from matmamba.training import LanguageModelModule, VisionClassificationModule
from matmamba.training.checkpoint import AtomicCheckpointIO
from matmamba.training.optim import build_param_groups, cosine_lr_factor
from matmamba.training.pipeline import train

TINY = dict(d_model=64, n_layer=2, d_state=16, headdim=8, chunk_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def vision(**kwargs):
    return VisionClassificationModule("vision_tiny", overrides=dict(TINY, image_size=16, patch_size=4), **kwargs)


def test_no_weight_decay_on_1d_params_tokens_and_embeddings():
    module = vision(optim={"no_decay": []})
    names = module.no_decay
    assert {"cls_token", "pos_embed"} <= names  # marked by the model
    for suffix in ("A_log", "D", "dt_bias", "norm.weight", "head.bias", "patch_embed.proj.bias"):
        assert any(n.endswith(suffix) for n in names), suffix
    assert not any(n.endswith(("in_proj.weight", "out_proj.weight", "head.weight")) for n in names)

    lm = LanguageModelModule("lm_tiny", overrides=TINY | {"vocab_size": 256}, optim={"no_decay": ["*embedding*"]})
    assert "backbone.embedding.weight" in lm.no_decay
    groups = build_param_groups(lm.net.named_parameters(), lm.no_decay, 0.1)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in lm.net.parameters()})  # tied head counted once
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(lm.net.backbone.embedding.weight) not in decayed and groups[0]["weight_decay"] == 0.1


def test_cosine_schedule_with_warmup():
    f = lambda s: cosine_lr_factor(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_width_subsets_are_seeded_and_keep_the_teacher():
    module = vision(widths_per_step=2, distill={"weight": 0.5}, seed=3)
    picks = [module.widths_for_step(s) for s in range(20)]
    assert all(len(p) == 2 and p[0] == 64 for p in picks)
    assert picks == [vision(widths_per_step=2, distill={"weight": 0.5}, seed=3).widths_for_step(s) for s in range(20)]
    assert len({tuple(p) for p in picks}) > 1
    assert vision().widths_for_step(0) == [64, 32, 16, 8]


def test_width_weights_follow_given_order():
    module = vision(widths=[16, 64], width_weights=[0.25, 1.0])
    assert module.widths == [64, 16] and module.width_weights == {16: 0.25, 64: 1.0}


def _grads_after_step(module, images, labels):
    module.net.zero_grad()
    widths = module.widths_for_step(0)
    teacher, total = None, 0.0
    for w in widths:
        out = module.forward_width(images, w)
        loss = module.width_loss(w, out, labels, teacher) * module.width_weights[w]
        if w == module.full_width and module.distill_weight > 0:
            teacher = out.detach()
        if module.backward_per_width:
            loss.backward()
        else:
            total = total + loss
    if not module.backward_per_width:
        total.backward()
    return {n: p.grad.clone() for n, p in module.net.named_parameters()}


def test_backward_per_width_gives_the_same_gradients():
    torch.manual_seed(0)
    joint = vision(distill={"weight": 0.3, "temperature": 2.0})
    per_width = vision(distill={"weight": 0.3, "temperature": 2.0}, backward_per_width=True)
    per_width.load_state_dict(joint.state_dict())
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    a, b = _grads_after_step(joint, images, labels), _grads_after_step(per_width, images, labels)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_distillation_loss():
    module = vision(distill={"weight": 1.0, "temperature": 2.0})
    logits = torch.randn(5, 10)
    assert float(module.distill_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(module.distill_loss(logits, torch.randn(5, 10))) > 0
    labels = torch.arange(5)
    # weight 1: the narrow width's loss is pure distillation; the widest keeps its task loss
    assert float(module.width_loss(32, logits, labels, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(module.width_loss(64, logits, labels, logits)) > 0


def test_mixup_soft_targets_and_label_smoothing():
    module = vision(label_smoothing=0.1, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    images, labels = module.split_batch((torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])), training=True)
    assert labels.shape == (4, 10) and torch.allclose(labels.sum(-1), torch.ones(4))
    assert float(labels.min()) > 0  # smoothing mass on every class
    assert torch.isfinite(module.task_loss(torch.randn(4, 10), labels))
    with pytest.raises(ValueError, match="even micro-batch"):
        module.split_batch((torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])), training=True)


def test_atomic_checkpoint_keeps_the_last_good_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=False) == {"step": 3}
    assert not (tmp_path / "last.ckpt.tmp").exists()


def test_training_logs_per_width_metrics_and_throughput(tmp_path):
    digits = TINY_VISION + ["++model.overrides.image_size=8", "++model.overrides.patch_size=2",
                            "++model.overrides.in_chans=1", "++model.overrides.chunk_size=17", "data.batch_size=16"]
    cfg = compose_cfg([*FAST, *digits, "trainer.max_steps=4", "callbacks.throughput.window=2",
                       "callbacks.memory.every_n_steps=2", "trainer.log_every_n_steps=1"], tmp_path)
    train(cfg)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    columns = set(rows[0])
    for w in (64, 32, 16, 8):
        assert {f"train/loss@{w}", f"val/loss@{w}", f"val/acc@{w}"} <= columns
    assert {"train/grad_norm", "perf/images_per_sec_per_device", "mem/max_rss_gib", "lr-AdamW/decay"} <= columns
    rates = [float(r["perf/images_per_sec_per_device"]) for r in rows if r.get("perf/images_per_sec_per_device")]
    assert rates and all(r > 0 for r in rates)
