"""The usage shown in our README and in the published project's README runs as written."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_our_readme_python_usage_runs():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_published_readme_usage_scaled_down():
    # The published README, with .cuda() dropped and the sizes reduced for a CPU test.
    from matmamba import MatMamba2

    matmamba_block = MatMamba2(d_model=512, d_state=128)
    b, l, d = 2, 96, 512
    x = torch.randn((b, l, d))
    y1 = matmamba_block(x)
    assert y1.shape == (b, l, d)
    y2 = matmamba_block(x, mrl_level=2)
    assert y2.shape == (b, l, d)
    matmamba_block.mixnmatch = True
    matmamba_block.mixnmatch_dims = 64
    y3 = matmamba_block(x)
    assert y3.shape == (b, l, d)
    matmamba_block.mixnmatch = False
    matmamba_block.mixnmatch_dims = matmamba_block.d_model
    assert torch.equal(matmamba_block(x), y1)
    assert not torch.allclose(y1, y2) and not torch.allclose(y2, y3)


def test_published_vision_and_lm_usage_scaled_down():
    from matmamba import MatMamba2Vision, MatMamba2VisionConfig, MatMambaConfig, MatMambaLMHeadModel

    vision = MatMamba2Vision(MatMamba2VisionConfig(d_model=64, n_layer=2, n_classes=10, image_size=32,
                                                   patch_size=8, d_state=16))
    images = torch.randn(2, 3, 32, 32)
    assert vision(images, mrl_level=2).shape == (2, 10)
    for layer in vision.layers:
        layer.mixer.mixnmatch = True
        layer.mixer.mixnmatch_dims = 16
    assert vision(images).shape == (2, 10)
    lm = MatMambaLMHeadModel(MatMambaConfig(d_model=64, n_layer=2, vocab_size=100, d_state=16))
    ids = torch.randint(0, 100, (2, 12))
    assert lm(ids).logits.shape == (2, 12, 104)
    assert lm(ids, mrl_level=4).logits.shape == (2, 12, 104)
