"""Export one configuration as a standalone dense model, and check that it is the same model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from matmamba.evaluation.submodels import Submodel


class ExportError(RuntimeError):
    """The exported model does not reproduce the nested model at its configuration."""


def count_parameters(model: nn.Module) -> int:
    """Parameters a model really holds (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _outputs(model: nn.Module, inputs: torch.Tensor, width=None) -> torch.Tensor:
    out = model(inputs, width=width)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.inference_mode()
def export_submodel(model: nn.Module, submodel: Submodel, directory: str | Path, check_inputs: torch.Tensor,
                    record: dict[str, Any] | None = None, rtol: float = 1e-4, atol: float = 1e-5) -> dict[str, Any]:
    """Write ``model.extract(submodel)`` with ``save_pretrained`` and verify the written folder.

    The folder is loaded back with ``matmamba.load_model`` (no nesting machinery involved) and
    must have exactly the submodel's parameter count and give the nested model's outputs at that
    configuration on ``check_inputs`` (float32, within ``rtol``/``atol``). ``record`` (the sweep
    row) is written beside the weights as ``export.json``. Returns what was checked.
    """
    from matmamba import load_model

    directory = Path(directory)
    was_training = model.training
    model.eval()
    dense = model.extract(submodel.spec).eval()
    dense.save_pretrained(directory)
    reloaded = load_model(directory).to(check_inputs.device).eval()

    expected_params = model.num_params(submodel.spec)
    params = count_parameters(reloaded)
    if params != expected_params:
        raise ExportError(f"exported {submodel.name} has {params:,} parameters, the nested model counts "
                          f"{expected_params:,} for it")
    nested = _outputs(model, check_inputs, submodel.spec)
    exported = _outputs(reloaded, check_inputs)
    max_diff = (nested - exported).abs().max().item()
    if not torch.allclose(exported, nested, rtol=rtol, atol=atol):
        raise ExportError(f"exported {submodel.name} differs from the nested model at that configuration "
                          f"(max abs difference {max_diff:.3g})")
    model.train(was_training)

    result = {
        "directory": str(directory),
        "configuration": submodel.name,
        "widths": list(submodel.widths),
        "layer_nheads": list(reloaded.config.layer_nheads),
        "params": params,
        "max_abs_diff": max_diff,
        "check_batch": int(check_inputs.shape[0]),
    }
    (directory / "export.json").write_text(json.dumps({**result, "sweep_row": record or {}}, indent=2) + "\n")
    return result
