"""MatMamba2-Vision: a ViT-shaped classifier whose token mixer is the nested MatMamba2 block.

patches -> linear embedding -> [patch tokens..., cls] + learned positions -> n_layer residual
MatMamba2 blocks (LayerNorm) -> LayerNorm -> cls token (or mean of patches) -> linear head.
The class token is appended at the end: the scan is causal, so only the last token has seen
every patch.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from matmamba.models.block import MatMamba2
from matmamba.models.common import ConfigBase, NestedModelMixin, ResidualBlock, RMSNorm, rescale_out_proj_


@dataclasses.dataclass
class MatMamba2VisionConfig(ConfigBase):
    d_model: int = 512
    n_layer: int = 20
    n_classes: int = 1000
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int | None = None  # None: d_model // 32, as published
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    d_intermediate: int = 0
    norm_epsilon: float = 1e-5
    rms_norm: bool = False
    residual_in_fp32: bool = False
    drop_path_rate: float = 0.0
    proj_drop_rate: float = 0.0
    pool: str = "cls"  # "cls" (last token) or "mean" (patch tokens); "avg" is the published alias
    head_bias_init: float | None = None  # the published recipes set -6.9 (= log(1/1000))
    widths: list[int] | None = None  # the widths trained jointly (default D, D/2, D/4, D/8)
    layer_nheads: list[int] | None = None  # heads per layer of an exported dense submodel (None: all)

    def __post_init__(self):
        self._check_block_shape()
        if self.d_intermediate:
            raise ValueError("d_intermediate > 0 (an MLP after each mixer) is not supported; use 0")
        if self.pool == "avg":
            self.pool = "mean"
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        self.dt_limit = tuple(self.dt_limit)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class MatMamba2Vision(NestedModelMixin, nn.Module):
    config_class = MatMamba2VisionConfig
    model_type = "matmamba2_vision"

    def __init__(self, config: MatMamba2VisionConfig | None = None, device=None, dtype=None, **kwargs):
        super().__init__()
        if config is None:
            config = MatMamba2VisionConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_chans,
                                      embed_dim=c.d_model, **factory)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model, **factory))
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_patches + 1, c.d_model, **factory) * 0.02)
        norm_cls = RMSNorm if c.rms_norm else nn.LayerNorm
        drop_paths = [c.drop_path_rate * i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]  # linear decay rule
        self.layers = nn.ModuleList(
            ResidualBlock(
                c.d_model,
                MatMamba2(c.d_model, layer_idx=i, proj_drop_rate=c.proj_drop_rate, **c.block_kwargs(i), **factory),
                norm_cls(c.d_model, eps=c.norm_epsilon, **factory),
                drop_path=drop_paths[i], residual_in_fp32=c.residual_in_fp32)
            for i in range(c.n_layer))
        self.norm_f = norm_cls(c.d_model, eps=c.norm_epsilon, **factory)
        self.head = nn.Linear(c.d_model, c.n_classes, **factory)
        rescale_out_proj_(self, c.n_layer)
        if c.head_bias_init is not None:
            nn.init.constant_(self.head.bias, c.head_bias_init)
        for p in (self.cls_token, self.pos_embed):
            p._no_weight_decay = True

    def forward_features(self, images: torch.Tensor, width=None, mrl_level=None) -> torch.Tensor:
        """Pooled features (b, d_model) after the final norm."""
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.in_chans, c.image_size, c.image_size):
            raise ValueError(f"expected images of shape (batch, {c.in_chans}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images (normalised), got {images.dtype}")
        layer_kwargs = self._layer_kwargs(width, mrl_level)
        x = self.patch_embed(images)
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1) + self.pos_embed
        hidden, residual = x, None
        for layer, kw in zip(self.layers, layer_kwargs):
            hidden, residual = layer(hidden, residual, **kw)
        residual = hidden + residual
        hidden = self.norm_f(residual.to(self.norm_f.weight.dtype))
        return hidden[:, -1] if c.pool == "cls" else hidden[:, :-1].mean(dim=1)

    def forward(self, images: torch.Tensor, width=None, mrl_level=None, return_features: bool = False,
                inference_params=None, **ignored):
        """images (b, in_chans, image_size, image_size) -> logits (b, n_classes).

        ``width``: an int for every layer or one width per layer; ``mrl_level``: width = d_model/m.
        """
        features = self.forward_features(images, width=width, mrl_level=mrl_level)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    # ---------------------------------------------------------------- counting
    def num_params(self, width=None, non_embedding: bool = False) -> int:
        """Parameters of the dense submodel at ``width``. ``non_embedding`` leaves out the patch
        embedding, the positions and the class token."""
        n = self._layers_params(width) + sum(p.numel() for p in self.norm_f.parameters())
        n += sum(p.numel() for p in self.head.parameters())
        if not non_embedding:
            n += sum(p.numel() for p in self.patch_embed.parameters()) + self.pos_embed.numel() + self.cls_token.numel()
        return n

    def flops_per_token(self, width=None) -> int:
        return sum(layer.mixer.flops_per_token(w) for layer, w in zip(self.layers, self._block_widths(width)))

    def flops_per_image(self, width=None) -> int:
        """Forward FLOPs for one image: blocks on every token, patch embedding, head."""
        c = self.config
        tokens = c.num_patches + 1
        patch = 2 * c.in_chans * c.patch_size**2 * c.d_model * c.num_patches
        return tokens * self.flops_per_token(width) + patch + 2 * c.d_model * c.n_classes
