"""Nested MatMamba2 models: the block, the vision classifier, the language model, the registry."""

from matmamba.models.block import InferenceParams, MatMamba2
from matmamba.models.common import RMSNorm, load_weights_file
from matmamba.models.lm import MatMambaConfig, MatMambaLMHeadModel
from matmamba.models.registry import create_model, list_models, model_config, register_model
from matmamba.models.vision import MatMamba2Vision, MatMamba2VisionConfig
from matmamba.models.widths import valid_widths

__all__ = [
    "InferenceParams", "MatMamba2", "MatMamba2Vision", "MatMamba2VisionConfig", "MatMambaConfig",
    "MatMambaLMHeadModel", "RMSNorm", "create_model", "list_models", "load_model", "load_weights_file",
    "model_config", "register_model", "valid_widths",
]


def load_model(path):
    """Load any ``save_pretrained`` directory, choosing the class from its config.json."""
    import json
    from pathlib import Path

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a directory written by save_pretrained")
    model_type = json.loads(config_file.read_text()).get("model_type")
    classes = {cls.model_type: cls for cls in (MatMamba2Vision, MatMambaLMHeadModel)}
    if model_type not in classes:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not one of {sorted(classes)}")
    return classes[model_type].from_pretrained(path)
