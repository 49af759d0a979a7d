"""Pieces shared by the vision and language models: norms, the residual block, configs, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from matmamba.models.block import MatMamba2
from matmamba.models.widths import check_width, per_layer_widths, valid_widths
from matmamba.ops._dispatch import fused_inference_applies

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"

# Keys of a published ssm_cfg that map onto MatMamba2 arguments (the rest are ignored with a warning).
SSM_KEYS = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_limit", "conv_init",
            "A_init_range", "dt_min", "dt_max", "dt_init_floor", "bias", "conv_bias", "D_has_hdim",
            "norm_before_gate")


def _triton_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a norm takes the Triton kernel (``fused_inference_applies``: on CUDA, eagerly,
    outside autograd, unless turned off; the kernel has no float64)."""
    return x.dtype != torch.float64 and fused_inference_applies("rmsnorm", (x, weight))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, statistic in float32 (or wider)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.weight.shape[0] and _triton_inference(x, self.weight):
            # one kernel (the gated norm's, without a gate) where the lines below launch about eight:
            # what bounds a decoding step at small batch is the number of launches. Called
            # directly, not through ops.gated_rmsnorm: no autograd here, and the dispatch and the
            # autograd.Function cost about as much host time as the launch itself
            from matmamba.ops.rmsnorm.triton_impl import _as_rows, rmsnorm_forward
            out, _ = rmsnorm_forward(_as_rows(x), None, self.weight, self.eps, False, x.shape[-1])
            return out.view(x.shape)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 statistics for half inputs
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth on the mixer branch (per sample)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResidualBlock(nn.Module):
    """Add -> norm -> mixer, returning (mixer output, residual): the published block structure.

    The residual sum is carried separately so that add and norm can fuse; the math is the usual
    pre-norm block ``x + mixer(norm(x))``.
    """

    def __init__(self, dim: int, mixer: MatMamba2, norm: nn.Module, drop_path: float = 0.0,
                 residual_in_fp32: bool = False):
        super().__init__()
        self.norm = norm
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, **mixer_kwargs):
        residual = hidden if residual is None else hidden + residual
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        return self.drop_path(self.mixer(hidden, **mixer_kwargs)), residual

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)


@dataclasses.dataclass
class ConfigBase:
    """Dataclass config with dict/JSON round trips that tolerate published extras."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        d.pop("model_type", None)
        d.pop("layout", None)
        names = {f.name for f in dataclasses.fields(cls)}
        ssm_cfg = d.pop("ssm_cfg", None) or {}
        for key, value in ssm_cfg.items():
            if key in SSM_KEYS and key in names:
                d.setdefault(key, value)
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})

    def _check_block_shape(self):
        d_model, expand = self.d_model, self.expand
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if self.headdim is None:
            if d_model < 32 or (expand * d_model) % (d_model // 32):
                raise ValueError(f"d_model={d_model}: the default headdim d_model//32 needs d_model >= 32 "
                                 f"dividing expand*d_model; set headdim explicitly")
        if not isinstance(self.n_layer, int) or self.n_layer <= 0:
            raise ValueError(f"n_layer must be a positive int, got {self.n_layer!r}")
        if self.widths is None:
            self.widths = [d_model // m for m in (1, 2, 4, 8) if d_model % m == 0]
            hd = self.resolved_headdim
            self.widths = [w for w in self.widths if (expand * w) % hd == 0]
        self.widths = [int(w) for w in self.widths]
        for w in self.widths:
            check_width(w, d_model, expand, self.resolved_headdim)
        if self.layer_nheads is not None:
            full = expand * d_model // self.resolved_headdim
            self.layer_nheads = [int(k) for k in self.layer_nheads]
            if len(self.layer_nheads) != self.n_layer or not all(0 < k <= full for k in self.layer_nheads):
                raise ValueError(f"layer_nheads must list n_layer={self.n_layer} head counts in [1, {full}], "
                                 f"got {self.layer_nheads}")

    @property
    def resolved_headdim(self) -> int:
        return self.headdim if self.headdim is not None else self.d_model // 32

    def block_kwargs(self, layer: int) -> dict[str, Any]:
        return dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, headdim=self.headdim,
                    ngroups=self.ngroups, chunk_size=self.chunk_size, dt_limit=tuple(self.dt_limit),
                    nheads=None if self.layer_nheads is None else self.layer_nheads[layer])


class NestedModelMixin:
    """Width handling, counting and checkpoints shared by the nested models.

    Subclasses set ``config_class``, ``model_type`` and have ``self.config`` and ``self.layers``
    (a ModuleList of ResidualBlock).
    """

    config_class: ClassVar[type]
    model_type: ClassVar[str]

    # ------------------------------------------------------------------ widths
    def valid_widths(self) -> list[int]:
        c = self.config
        return valid_widths(c.d_model, c.expand, c.resolved_headdim)

    @property
    def widths_default(self) -> list[int]:
        return list(self.config.widths)

    def _layer_kwargs(self, width, mrl_level) -> list[dict]:
        """Per-layer mixer kwargs. A width (int or list) is validated for every layer up front."""
        c = self.config
        if width is None:
            return [{"mrl_level": mrl_level}] * c.n_layer if mrl_level is not None else [{}] * c.n_layer
        widths = per_layer_widths(width, None, c.n_layer, c.d_model)
        for i, (layer, w) in enumerate(zip(self.layers, widths)):
            try:
                layer.mixer.resolve_width(w)
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
        return [{"width": int(w)} for w in widths]

    def set_width(self, width=None):
        """Make ``width`` (int, per-layer list, or None for full) the default of later calls.

        Uses the published ``mixnmatch`` switches on every layer, so it composes with code that
        sets them directly.
        """
        kwargs = self._layer_kwargs(width, None)
        for layer, kw in zip(self.layers, kwargs):
            layer.mixer.mixnmatch = "width" in kw
            layer.mixer.mixnmatch_dims = kw.get("width", self.config.d_model)

    def layer_heads(self, width=None) -> list[int]:
        """Heads each layer uses for ``width`` (int, per-layer list, or None for each layer's own)."""
        return [layer.mixer.resolve_heads(kw.get("width")) for layer, kw in
                zip(self.layers, self._layer_kwargs(width, None))]

    def extract(self, width=None):
        """A standalone dense model of exactly the submodel at ``width`` (int or per-layer list).

        Its blocks are plain MatMamba2 blocks with as many heads as the width uses (``layer_nheads``
        in its config); at full width it computes what this model computes at ``width``.
        """
        config = dataclasses.replace(self.config, layer_nheads=self.layer_heads(width), widths=[])
        dense = type(self)(config).to(device=next(self.parameters()).device,
                                      dtype=next(self.parameters()).dtype)
        state = {k: v for k, v in self.state_dict().items() if ".mixer." not in k}
        for i, (layer, k) in enumerate(zip(self.layers, config.layer_nheads)):
            mixer_prefix = _layer_prefix(dense, i) + "mixer."
            state.update({mixer_prefix + name: t for name, t in layer.mixer.dense_state_dict(k).items()})
        dense.load_state_dict(state, strict=True)
        return dense

    # ---------------------------------------------------------------- counting
    def _block_widths(self, width) -> list[int | None]:
        return [kw.get("width") for kw in self._layer_kwargs(width, None)]

    def _layers_params(self, width) -> int:
        n = 0
        for layer, w in zip(self.layers, self._block_widths(width)):
            n += layer.mixer.num_params(w) + sum(p.numel() for p in layer.norm.parameters())
        return n

    # ------------------------------------------------------------ checkpoints
    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict in the published layout and key names."""
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        for name, module in self.named_modules():
            if isinstance(module, MatMamba2):
                prefix = name + "."
                for key in [k for k in sd if k.startswith(prefix) and k[len(prefix):] in _INTERNAL_BLOCK_KEYS]:
                    del sd[key]
                sd.update(module.published_state_dict(prefix))
        return sd

    def load_published_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        return self.load_state_dict(self._prepare_state_dict(dict(state_dict)), strict=strict)

    def _prepare_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (published layout) to a directory.

        The weights file is written to a temporary name and moved into place, so a crash mid-write
        leaves any earlier file intact.
        """
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous().cpu() for k, v in self._state_dict_for_save().items()}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(sd, str(tmp), metadata={"format": "pt", "layout": "published"})
        os.replace(tmp, out / WEIGHTS_NAME)
        config = {"model_type": self.model_type, "layout": "published", **self.config.to_dict()}
        tmp = out / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, out / CONFIG_NAME)
        return out

    def _state_dict_for_save(self) -> dict[str, torch.Tensor]:
        return self.published_state_dict()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, map_location="cpu", strict: bool = True, **overrides):
        """Load from a ``save_pretrained`` directory (or a Hugging Face Hub repo id, when online).

        Reads ``model.safetensors``, or ``pytorch_model.bin`` with ``weights_only=True``: no pickled
        code is ever executed.
        """
        directory = Path(path)
        if not directory.is_dir():
            if directory.exists():
                raise ValueError(f"{path} is a file; from_pretrained expects a directory with "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
            if "/" in str(path) and not str(path).startswith((".", "/")) and str(path).count("/") == 1:
                from huggingface_hub import snapshot_download
                directory = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
            else:
                raise FileNotFoundError(f"no checkpoint directory at {path}")
        config_dict = read_config_file(directory)
        config_dict.update(overrides)
        model = cls(cls.config_class.from_dict(config_dict))
        model.load_state_dict(load_weights_file(directory), strict=strict)
        return model.to(map_location) if map_location is not None else model


def _layer_prefix(model: nn.Module, i: int) -> str:
    for name, module in model.named_modules():
        if module is model.layers[i]:
            return name + "."
    raise KeyError(i)


_INTERNAL_BLOCK_KEYS = {"in_proj.weight", "in_proj.bias", "conv_weight", "conv_bias", "dt_bias", "A_log", "D",
                        "norm.weight", "out_proj.weight", "out_proj.bias"}


def read_config_file(directory: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint directory's ``config.json``; clear errors when it is missing or corrupt."""
    config_file = Path(directory) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; expected a save_pretrained or published directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); the checkpoint is corrupt") from None


def load_weights_file(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a directory's weights: safetensors, else a torch file loaded with weights_only=True."""
    directory = Path(directory)
    st, legacy = directory / WEIGHTS_NAME, directory / LEGACY_WEIGHTS_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read {st}: {e}. The file is corrupt or truncated; "
                             f"re-export it with save_pretrained") from None
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unpickling failure the same way
            raise ValueError(f"cannot read {legacy} with weights_only=True: {e}") from None
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def rescale_out_proj_(model: nn.Module, n_layer: int, n_residuals_per_layer: int = 1) -> None:
    """GPT-2 style init: out_proj scaled by 1/sqrt(n_residuals * n_layer); Linear biases zeroed."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, MatMamba2):
            nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                module.out_proj.weight /= math.sqrt(n_residuals_per_layer * n_layer)
