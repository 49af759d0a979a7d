"""The published MatMamba2 math, written from the equations on published-layout state dicts.

Independent of ``matmamba``'s internal layout and kernels: plain loops in float64, used as the
oracle for the nested block, the checkpoint conversion and the models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_forward(sd: dict, u: torch.Tensor, width: int, *, d_state: int, headdim: int, ngroups: int = 1,
                  expand: int = 2, eps: float = 1e-5, prefix: str = "") -> torch.Tensor:
    """Published MatMamba2 at ``width``: a plain Mamba2 block of inner width expand*width."""
    g = lambda name: sd[prefix + name].to(u.dtype)  # noqa: E731
    b, l, D = u.shape
    E, GN, P = expand * D, ngroups * d_state, headdim
    H, k = E // P, expand * width // P
    Ek = k * P
    W = g("in_proj.weight")
    z_w, x_w = W[:E][:Ek], W[E : 2 * E][:Ek]
    B_w, C_w = W[2 * E : 2 * E + GN], W[2 * E + GN : 2 * E + 2 * GN]
    dt_w = W[2 * E + 2 * GN :][:k]
    assert W.shape[0] == 2 * E + 2 * GN + H
    z, x, B, C, dt = (u @ w.T for w in (z_w, x_w, B_w, C_w, dt_w))

    # Depthwise causal conv over the channels [x[:Ek], B, C] (published channel order x | B | C).
    conv_w = g("conv1d.weight")[:, 0, :]
    conv_b = g("conv1d.bias")
    conv_w = torch.cat([conv_w[:Ek], conv_w[E:]])
    conv_b = torch.cat([conv_b[:Ek], conv_b[E:]])
    xBC = torch.cat([x, B, C], dim=-1)
    width_k = conv_w.shape[1]
    padded = F.pad(xBC, (0, 0, width_k - 1, 0))
    conv = conv_b + sum(conv_w[:, j] * padded[:, j : j + l] for j in range(width_k))
    xBC = conv * torch.sigmoid(conv)
    x, B, C = xBC[..., :Ek], xBC[..., Ek : Ek + GN], xBC[..., Ek + GN :]

    dt = F.softplus(dt + g("dt_bias")[:k])
    A = -torch.exp(g("A_log")[:k])
    Dskip = g("D")[:k]
    x = x.reshape(b, l, k, P)
    B = B.reshape(b, l, ngroups, d_state)
    C = C.reshape(b, l, ngroups, d_state)
    heads_per_group = H // ngroups
    h = torch.zeros(b, k, P, d_state, dtype=u.dtype)
    ys = []
    for t in range(l):
        Bt = B[:, t, torch.arange(k) // heads_per_group]  # (b, k, N)
        Ct = C[:, t, torch.arange(k) // heads_per_group]
        decay = torch.exp(dt[:, t] * A)  # (b, k)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        ys.append(torch.einsum("bkpn,bkn->bkp", h, Ct) + Dskip[:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, l, Ek)

    y = y * (z * torch.sigmoid(z))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * g("norm.weight")[:Ek]
    out = y @ g("out_proj.weight")[:, :Ek].T
    if prefix + "out_proj.bias" in sd:
        out = out + g("out_proj.bias")
    return out


def _norm(sd, prefix, x, rms: bool, eps=1e-5):
    w = sd[prefix + "weight"].to(x.dtype)
    if rms:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, sd[prefix + "bias"].to(x.dtype), eps)


def stack_forward(sd, hidden, widths, *, layer_prefix, rms, **block_kw):
    """Residual stack: x_{i+1} = x_i + block_i(norm_i(x_i)); returns the final residual stream."""
    residual = hidden
    for i, w in enumerate(widths):
        p = f"{layer_prefix}{i}."
        residual = residual + block_forward(sd, _norm(sd, p + "norm.", residual, rms), w, prefix=p + "mixer.",
                                            **block_kw)
    return residual


def lm_forward(sd, ids, widths, **block_kw):
    hidden = sd["backbone.embedding.weight"].double()[ids]
    residual = stack_forward(sd, hidden, widths, layer_prefix="backbone.layers.", rms=True, **block_kw)
    hidden = _norm(sd, "backbone.norm_f.", residual, rms=True)
    return hidden @ sd.get("lm_head.weight", sd["backbone.embedding.weight"]).double().T


def vision_forward(sd, images, widths, *, patch_size, pool="cls", **block_kw):
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"].double(), sd["patch_embed.proj.bias"].double(),
                 stride=patch_size)
    x = x.flatten(2).transpose(1, 2)  # (b, patches, D)
    x = torch.cat([x, sd["cls_token"].double().expand(x.shape[0], -1, -1)], dim=1) + sd["pos_embed"].double()
    residual = stack_forward(sd, x, widths, layer_prefix="layers.", rms=False, **block_kw)
    hidden = _norm(sd, "norm_f.", residual, rms=False)
    feat = hidden[:, -1] if pool == "cls" else hidden[:, :-1].mean(1)
    return feat @ sd["head.weight"].double().T + sd["head.bias"].double()
