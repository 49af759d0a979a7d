"""Named model sizes, timm-style: ``create_model("vision_b16", drop_path_rate=0.1)``."""

from __future__ import annotations

from typing import Any

from matmamba.models.lm import MatMambaLMHeadModel
from matmamba.models.vision import MatMamba2Vision

GPT2_VOCAB = 50277  # the published LMs' vocabulary (GPT-NeoX tokenizer size), padded to 50280

_REGISTRY: dict[str, tuple[type, dict[str, Any], str]] = {}


def register_model(name: str, cls: type, description: str, **config: Any) -> None:
    _REGISTRY[name] = (cls, config, description)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> tuple[type, dict[str, Any], str]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_config(name: str, **overrides: Any):
    """The config a registered name gives, with overrides applied (validated)."""
    cls, config, _ = model_entry(name)
    fields = set(cls.config_class.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown config fields {unknown}; valid fields: {sorted(fields)}")
    return cls.config_class(**{**config, **overrides})


def create_model(name: str, **overrides: Any):
    """Build a registered model; ``overrides`` are config fields (``n_layer=2``, ``widths=[...]``)."""
    cls, _, _ = model_entry(name)
    return cls(model_config(name, **overrides))


# --- vision (ImageNet, patch 16, 224 px); DESIGN §4 --------------------------------------------
_IMAGENET = dict(n_classes=1000, image_size=224, patch_size=16, in_chans=3, head_bias_init=-6.9)
register_model("vision_35m", MatMamba2Vision, "MatMamba-Vision-35M (D=512, 20 layers)", d_model=512, n_layer=20, **_IMAGENET)
register_model("vision_135m", MatMamba2Vision, "MatMamba-Vision-135M (D=1024, 20 layers)", d_model=1024, n_layer=20, **_IMAGENET)
register_model("vision_b16", MatMamba2Vision, "ViT-B/16-shaped MatMamba-Vision (D=768, 24 layers)", d_model=768, n_layer=24, **_IMAGENET)

# --- language (FineWeb); DESIGN §4 --------------------------------------------------------------
register_model("lm_130m", MatMambaLMHeadModel, "MatMamba-LM-130M (D=768, 24 layers)", d_model=768, n_layer=24, vocab_size=GPT2_VOCAB)
register_model("lm_370m", MatMambaLMHeadModel, "MatMamba-LM-370M (D=1024, 48 layers)", d_model=1024, n_layer=48, vocab_size=GPT2_VOCAB)
register_model("lm_790m", MatMambaLMHeadModel, "MatMamba-LM-790M (D=1536, 48 layers)", d_model=1536, n_layer=48, vocab_size=GPT2_VOCAB)
register_model("lm_1_4b", MatMambaLMHeadModel, "MatMamba-LM-1.4B (D=2048, 48 layers)", d_model=2048, n_layer=48, vocab_size=GPT2_VOCAB)

# --- small models for the bundled data and the tests -------------------------------------------
register_model("vision_digits", MatMamba2Vision, "scikit-learn digits: 8x8 grayscale, patch 2, 10 classes",
               d_model=128, n_layer=4, d_state=16, n_classes=10, image_size=8, patch_size=2, in_chans=1, chunk_size=64)
register_model("lm_pydoc", MatMambaLMHeadModel, "byte-level LM for the bundled Python docs",
               d_model=128, n_layer=4, d_state=32, vocab_size=256, chunk_size=64)
register_model("vision_tiny", MatMamba2Vision, "test-sized vision model", d_model=64, n_layer=2, d_state=16,
               headdim=8, n_classes=10, image_size=16, patch_size=4, in_chans=3, chunk_size=16)
register_model("lm_tiny", MatMambaLMHeadModel, "test-sized LM", d_model=64, n_layer=2, d_state=16, headdim=8,
               vocab_size=256, chunk_size=16)
