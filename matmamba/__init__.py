"""MatMamba: nested (Matryoshka) Mamba2 state-space models.

``from matmamba import MatMamba2`` gives the block; the models, the registry and checkpoints are
here too. Kernels live in ``matmamba.ops``; training (Lightning, Hydra) in ``matmamba.training``.
"""

from matmamba.models import (
    InferenceParams,
    MatMamba2,
    MatMamba2Vision,
    MatMamba2VisionConfig,
    MatMambaConfig,
    MatMambaLMHeadModel,
    create_model,
    list_models,
    load_model,
    model_config,
    register_model,
    valid_widths,
)

__version__ = "0.1.0"

__all__ = [
    "InferenceParams", "MatMamba2", "MatMamba2Vision", "MatMamba2VisionConfig", "MatMambaConfig",
    "MatMambaLMHeadModel", "create_model", "list_models", "load_model", "model_config", "register_model",
    "valid_widths",
]
