"""The vision and language models: nesting per layer, decoding, published layout, registry, counting."""

import json

import pytest
import torch

import matmamba
from matmamba import (MatMamba2Vision, MatMamba2VisionConfig, MatMambaConfig, MatMambaLMHeadModel, create_model,
                      list_models)
from published_reference import lm_forward, vision_forward

BLOCK_KW = dict(d_state=8, headdim=8)


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tiny_lm(seed=0, n_layer=3, **kw):
    torch.manual_seed(seed)
    cfg = MatMambaConfig(d_model=32, n_layer=n_layer, vocab_size=61, chunk_size=8, **BLOCK_KW, **kw)
    return perturbed(MatMambaLMHeadModel(cfg).double(), seed)


def tiny_vision(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MatMamba2VisionConfig(d_model=32, n_layer=3, n_classes=7, image_size=8, patch_size=4, in_chans=3,
                                chunk_size=4, **BLOCK_KW, **kw)
    return perturbed(MatMamba2Vision(cfg).double(), seed)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# Widths for d_model=32, headdim=8: multiples of 4 -> 2*w/8 heads; 12 gives 3 heads (odd).
MIXES = [32, 12, [32, 12, 4]]


@pytest.mark.parametrize("width", MIXES)
def test_lm_matches_published_math(width):
    model = tiny_lm()
    ids = torch.randint(0, 61, (2, 13))
    widths = width if isinstance(width, list) else [width] * 3
    ref = lm_forward(model.published_state_dict(), ids, widths, **BLOCK_KW)
    assert rel_err(model(ids, width=width).logits, ref) < 1e-8


@pytest.mark.parametrize("width", MIXES)
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vision_matches_published_math(width, pool):
    model = tiny_vision(pool=pool).eval()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    widths = width if isinstance(width, list) else [width] * 3
    ref = vision_forward(model.published_state_dict(), images, widths, patch_size=4, pool=pool, **BLOCK_KW)
    assert rel_err(model(images, width=width), ref) < 1e-8


def test_class_token_is_appended_last():
    model = tiny_vision().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    base = model(images)
    with torch.no_grad():
        model.cls_token.add_(torch.randn_like(model.cls_token))
    assert not torch.allclose(model(images), base)  # the pooled (last) token is the class token
    with torch.no_grad():
        model.pos_embed[:, 0].add_(torch.randn_like(model.pos_embed[:, 0]))
    assert not torch.allclose(model(images), base)  # and it has seen the first patch


@pytest.mark.parametrize("width", [32, 12, [32, 12, 4]])
def test_greedy_generate_equals_repeated_full_forward(width):
    model = tiny_lm(seed=3)
    prompt = torch.randint(0, 61, (2, 7))
    out = model.generate(prompt, max_new_tokens=12, width=width, temperature=0)
    assert out.shape == (2, 19) and torch.equal(out[:, :7], prompt)
    seq = prompt
    for _ in range(12):
        nxt = model(seq, width=width).logits[:, -1, :61].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


def test_sampling_respects_top_k_and_is_reproducible():
    model = tiny_lm(seed=4)
    prompt = torch.randint(0, 61, (3, 5))
    a = model.generate(prompt, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(a, greedy), "top_k=1 sampling is greedy"
    s1 = model.generate(prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    s2 = model.generate(prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)


def test_published_switches_on_models():
    model = tiny_vision().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = model(images, width=16)
    assert torch.equal(model(images, mrl_level=2), y)
    for layer in model.layers:
        layer.mixer.mixnmatch, layer.mixer.mixnmatch_dims = True, 16
    assert torch.equal(model(images), y)
    model.set_width(None)
    assert torch.equal(model(images), model(images, width=32))


def test_vocab_is_padded_and_head_tied():
    model = tiny_lm()
    assert model.config.padded_vocab_size == 64
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 64)


def test_published_state_dict_keys_and_round_trip():
    model = tiny_lm()
    sd = model.published_state_dict()
    assert "backbone.layers.0.mixer.conv1d.weight" in sd and "backbone.layers.0.mixer.in_proj.weight" in sd
    assert "backbone.norm_f.weight" in sd and "lm_head.weight" in sd
    fresh = tiny_lm(seed=9)
    fresh.load_published_state_dict(sd)
    ids = torch.randint(0, 61, (2, 9))
    assert torch.equal(fresh(ids, width=12).logits, model(ids, width=12).logits)
    vis = tiny_vision()
    vsd = vis.published_state_dict()
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm_f.weight", "head.bias",
                "layers.2.mixer.conv1d.bias", "layers.0.norm.bias"):
        assert key in vsd, key


def test_save_and_load_pretrained(tmp_path):
    model = tiny_lm().float()
    model.save_pretrained(tmp_path / "lm")
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert cfg["model_type"] == "matmamba_lm" and cfg["d_model"] == 32
    loaded = matmamba.load_model(tmp_path / "lm")
    ids = torch.randint(0, 61, (2, 9))
    assert torch.equal(loaded(ids, width=[32, 4, 12]).logits, model(ids, width=[32, 4, 12]).logits)
    vis = tiny_vision().float()
    vis.save_pretrained(tmp_path / "vis")
    again = MatMamba2Vision.from_pretrained(tmp_path / "vis")
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(again.eval()(images), vis.eval()(images))


def test_corrupt_or_missing_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        MatMambaLMHeadModel.from_pretrained(tmp_path / "nope")
    model = tiny_lm()
    model.save_pretrained(tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        MatMambaLMHeadModel.from_pretrained(tmp_path / "lm")
    (tmp_path / "lm" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MatMambaLMHeadModel.from_pretrained(tmp_path / "lm")


def test_loading_a_checkpoint_of_another_shape_fails_clearly():
    small = tiny_lm()
    other = MatMambaLMHeadModel(MatMambaConfig(d_model=32, n_layer=3, vocab_size=61, d_state=16, headdim=8))
    with pytest.raises(RuntimeError, match="another config|size mismatch"):
        other.load_published_state_dict(small.published_state_dict())


def test_bad_model_inputs():
    lm, vis = tiny_lm(), tiny_vision()
    with pytest.raises(ValueError, match=r"integer tensor of shape \(batch, seqlen\)"):
        lm(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        lm(torch.full((1, 3), 64))
    with pytest.raises(ValueError, match=r"one width per layer: got 2 widths.*n_layer=3"):
        lm(torch.zeros(1, 3, dtype=torch.long), width=[32, 16])
    with pytest.raises(ValueError, match=r"layer 1: invalid width 6.*[Vv]alid widths"):
        lm(torch.zeros(1, 3, dtype=torch.long), width=[32, 6, 16])
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 8, 8\)"):
        vis(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="either width= or mrl_level="):
        from matmamba.models.widths import per_layer_widths
        per_layer_widths(16, 2, 3, 32)
    with pytest.raises(ValueError, match="unknown model 'lm_9b'"):
        create_model("lm_9b")
    with pytest.raises(ValueError, match="unknown config fields"):
        create_model("lm_tiny", n_layers=3)
    with pytest.raises(ValueError, match="image_size=10 must be a multiple of patch_size=4"):
        create_model("vision_tiny", image_size=10)


PUBLISHED_SIZES = {  # name: (non-embedding parameters at full width, roughly, in millions)
    "vision_35m": 35, "vision_135m": 135, "vision_b16": 80, "lm_130m": 90, "lm_370m": 320, "lm_790m": 720,
    "lm_1_4b": 1280,
}


@pytest.mark.parametrize("name", list_models())
def test_registry_builds_every_model(name):
    with torch.device("meta"):
        model = create_model(name)
    c = model.config
    assert model.widths_default == [c.d_model, c.d_model // 2, c.d_model // 4, c.d_model // 8]
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(width=c.d_model // 8) < model.num_params()
    if name in PUBLISHED_SIZES:
        millions = model.num_params(non_embedding=True) / 1e6
        assert 0.8 * PUBLISHED_SIZES[name] < millions < 1.2 * PUBLISHED_SIZES[name], millions
        assert model.layers[0].mixer.headdim == c.d_model // 32 and model.layers[0].mixer.nheads == 64


def test_flops_fall_with_width_and_per_layer_mixes_lie_between():
    model = create_model("lm_tiny")
    full, half, quarter = (model.flops_per_token(w) for w in (64, 32, 16))
    assert full > half > quarter
    mix = model.flops_per_token([64, 16])
    assert quarter < mix < full
    vis = create_model("vision_tiny")
    assert vis.flops_per_image(32) < vis.flops_per_image()


@pytest.mark.parametrize("width", [12, [32, 12, 4]])
def test_extracted_dense_submodel_is_exactly_the_nested_one(width, tmp_path):
    model = tiny_lm(seed=5)
    dense = model.extract(width)
    assert dense.config.layer_nheads == model.layer_heads(width)
    assert sum(p.numel() for p in dense.parameters()) == model.num_params(width)
    ids = torch.randint(0, 61, (2, 11))
    assert rel_err(dense(ids).logits, model(ids, width=width).logits) < 1e-12
    dense.float().save_pretrained(tmp_path / "dense")
    again = matmamba.load_model(tmp_path / "dense")
    assert again.config.layer_nheads == dense.config.layer_nheads
    assert torch.allclose(again(ids).logits, dense(ids).logits)
    vis = tiny_vision(seed=6).eval()
    vdense = vis.extract(width).eval()
    assert sum(p.numel() for p in vdense.parameters()) == vis.num_params(width)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert rel_err(vdense(images), vis(images, width=width)) < 1e-12
    with pytest.raises(ValueError, match="invalid width 32"):
        vdense(images, width=32) if width == 12 else vdense(images, width=[32, 32, 32])


def test_generate_cuda_graph_needs_cuda():
    model = tiny_lm(seed=4)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        model.generate(torch.randint(0, 61, (1, 4)), 3, temperature=0, cuda_graph=True)
