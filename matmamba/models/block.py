"""The nested MatMamba2 block.

Full block, width D (= d_model), inner width E = expand*D, head dim P, heads H = E/P, state size N,
groups G, conv width W:

    zxBCdt = in_proj(u)                              u: (b, l, D)
    xBC    = silu(causal_conv1d(x || B || C))       depthwise, width W, with bias
    dt     = softplus(dt + dt_bias)                  clamped to dt_limit
    h_t    = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T    per head, A = -exp(A_log)
    y_t    = C_t h_t + D x_t
    y      = rmsnorm(y * silu(z)) * norm_weight      statistic over the used width
    out    = out_proj(y)

At width w the block uses the first k = expand*w/P heads: their z, x and dt, their conv channels,
dt_bias/A_log/D[:k], norm_weight[:k*P] and the first k*P input columns of out_proj. B and C (and
their conv channels) are shared by every width. The residual stream stays D wide.

Internal layout: every width is a prefix. The published layout orders in_proj rows as
[z (E) | x (E) | B (GN) | C (GN) | dt (H)] and conv channels as [x | B | C], so a width needs
gathered copies of the weights. Here the rows are

    in_proj rows:   [B (GN) | C (GN) | dt (H) | z_0 x_0 | z_1 x_1 | ... | z_{H-1} x_{H-1}]   (P rows each)
    conv channels:  [B (GN) | C (GN) | x_0 | x_1 | ... | x_{H-1}]

so width k is ``in_proj.weight[:2GN + H + 2kP]`` and ``conv_weight[:2GN + kP]``: views, one GEMM,
no copies. (All H dt rows are computed at every width; that is H extra outputs next to 2GN + 2kP,
and their gradient is zero for unused heads.) ``published_state_dict`` / loading a published
state dict convert between the two layouts losslessly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from matmamba import ops
from matmamba.models.widths import check_width, valid_widths, width_from_mrl_level
from matmamba.ops._dispatch import fused_inference_applies, resolve_impl

CPU_CHUNK_SIZE = 64


def _prefix(t: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """The first ``n`` entries of ``t`` along ``dim``: the width's view of a parameter. At full
    width the parameter itself, so autograd adds no slice node (whose backward zero-fills a
    full-size gradient and copies into it: two launches per parameter for nothing)."""
    return t if t.shape[dim] == n else t.narrow(dim, 0, n)


@dataclass
class InferenceParams:
    """Recurrent decoding state shared by the layers of a model (mamba_ssm-compatible fields)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0


class GatedRMSNorm(nn.Module):
    """rmsnorm(x * silu(z)) * weight over the first ``x.shape[-1]`` channels (the used width)."""

    def __init__(self, dim: int, eps: float = 1e-5, norm_before_gate: bool = False, device=None, dtype=None):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return ops.gated_rmsnorm(x, z, _prefix(self.weight, x.shape[-1]), eps=self.eps,
                                 norm_before_gate=self.norm_before_gate)


class MatMamba2(nn.Module):
    """A Mamba2 block whose first k heads form a complete smaller block, for every k.

    Published usage is kept: ``block(x)``, ``block(x, mrl_level=2)``, and
    ``block.mixnmatch = True; block.mixnmatch_dims = 64``. Ours: ``block(x, width=192)``.
    Precedence: ``width=`` > ``mixnmatch_dims`` (if ``mixnmatch``, as published) > ``mrl_level=`` > full width.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        proj_drop_rate: float = 0.0,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        nheads: int | None = None,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        **ignored,
    ):
        super().__init__()
        unknown = set(ignored) - {"use_mem_eff_path", "d_ssm", "process_group", "sequence_parallel", "layer"}
        if unknown:
            raise TypeError(f"MatMamba2 got unexpected arguments: {sorted(unknown)}")
        if ignored.get("d_ssm") not in (None, expand * d_model):
            raise ValueError("d_ssm (a gated-MLP part beside the SSM) is not supported: leave it None")
        if not rmsnorm:
            raise ValueError("rmsnorm=False is not supported: the nested block normalises over the used width")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        # The published models fix headdim = d_model / 32 (64 heads at full width).
        self.headdim = headdim if headdim is not None else d_model // 32
        if self.headdim <= 0 or (expand * d_model) % self.headdim:
            raise ValueError(f"headdim={self.headdim} must be positive and divide expand*d_model={expand * d_model} "
                             f"(default headdim is d_model // 32, so d_model must be >= 32)")
        # nheads < expand*d_model/headdim builds a narrower dense block: an exported submodel.
        full_heads = expand * d_model // self.headdim
        self.nheads = full_heads if nheads is None else nheads
        if not 0 < self.nheads <= full_heads:
            raise ValueError(f"nheads={nheads} must be in [1, {full_heads}] (expand*d_model/headdim)")
        self.d_inner = self.nheads * self.headdim
        self.ngroups = ngroups
        if self.nheads % ngroups:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {self.nheads}")
        self.D_has_hdim, self.norm_before_gate = D_has_hdim, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        # Published switches, kept working as attributes.
        self.mixnmatch = False
        self.mixnmatch_dims = d_model

        G_N = ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * G_N + self.nheads + 2 * self.d_inner, bias=bias, **factory)
        conv_dim = 2 * G_N + self.d_inner
        self.conv_weight = nn.Parameter(torch.empty(conv_dim, d_conv, **factory))
        self.conv_bias = nn.Parameter(torch.empty(conv_dim, **factory)) if conv_bias else None
        # nn.Conv1d's default init: uniform(+-1/sqrt(fan_in)), fan_in = d_conv for a depthwise conv.
        bound = conv_init if conv_init is not None else 1.0 / math.sqrt(d_conv)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        if self.conv_bias is not None:
            nn.init.uniform_(self.conv_bias, -1.0 / math.sqrt(d_conv), 1.0 / math.sqrt(d_conv))

        # dt_bias = softplus^-1(dt0), dt0 log-uniform in [dt_min, dt_max].
        dt = torch.exp(torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(dtype or torch.float32))
        A = torch.empty(self.nheads, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.float32))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads, device=device))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, norm_before_gate=norm_before_gate, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.drop1 = nn.Dropout(proj_drop_rate)
        self.drop2 = nn.Dropout(proj_drop_rate)
        self.register_load_state_dict_pre_hook(_convert_published_on_load)

    # ------------------------------------------------------------------ widths
    @property
    def max_width(self) -> int:
        """The widest width this block holds (d_model, unless it is an exported narrower block)."""
        return self.d_inner // self.expand if self.d_inner % self.expand == 0 else self.d_inner / self.expand

    def valid_widths(self) -> list[int]:
        return valid_widths(self.d_model, self.expand, self.headdim, int(self.max_width))

    def resolve_heads(self, width: int | None = None, mrl_level: int | None = None) -> int:
        """How many heads a call with these arguments uses."""
        return self.heads_for_width(self.resolve_width(width, mrl_level))

    def resolve_width(self, width: int | None = None, mrl_level: int | None = None) -> int:
        """The width this call uses (see the class docstring for precedence)."""
        if width is None and self.mixnmatch:
            width = self.mixnmatch_dims
        if width is None and mrl_level is not None:
            width = width_from_mrl_level(mrl_level, self.d_model)
        if width is None:
            return self.max_width  # all heads
        return check_width(width, self.d_model, self.expand, self.headdim, int(self.max_width))

    def heads_for_width(self, width: int | float) -> int:
        return int(self.expand * width) // self.headdim

    @property
    def _gn(self) -> int:
        return self.ngroups * self.d_state

    def _in_proj_rows(self, k: int) -> int:
        return 2 * self._gn + self.nheads + 2 * k * self.headdim

    def _conv_channels(self, k: int) -> int:
        return 2 * self._gn + k * self.headdim

    # ----------------------------------------------------------------- forward
    def _split_projection(self, zxbcdt: torch.Tensor, k: int):
        """Views of z, x (..., k, P), B||C (..., 2GN) and dt (..., k) inside the in_proj output."""
        gn2, H, P = 2 * self._gn, self.nheads, self.headdim
        BC = zxbcdt[..., :gn2]
        dt = zxbcdt[..., gn2 : gn2 + k]
        heads = zxbcdt[..., gn2 + H :].unflatten(-1, (k, 2, P))
        return heads[..., 0, :], heads[..., 1, :], BC, dt

    def forward(self, u: torch.Tensor, width: int | None = None, mrl_level: int | None = None,
                seq_idx: torch.Tensor | None = None, inference_params: InferenceParams | None = None,
                **ignored) -> torch.Tensor:
        """u: (batch, seqlen, d_model) -> (batch, seqlen, d_model)."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"MatMamba2 expects input of shape (batch, seqlen, d_model={self.d_model}), "
                             f"got {tuple(u.shape)}")
        if not u.is_floating_point():
            raise ValueError(f"MatMamba2 expects a floating-point input, got {u.dtype}")
        k = self.resolve_heads(width, mrl_level)
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._states_from_cache(inference_params, u.shape[0])
            if inference_params.seqlen_offset > 0:
                if u.shape[1] != 1:
                    raise ValueError("after the prompt, decoding takes one token per call")
                return self._step(u, conv_state, ssm_state, k)

        b, l, _ = u.shape
        P, gn = self.headdim, self._gn
        rows = self._in_proj_rows(k)
        bias = _prefix(self.in_proj.bias, rows) if self.in_proj.bias is not None else None
        zxbcdt = self.drop1(F.linear(u, _prefix(self.in_proj.weight, rows), bias))

        channels = self._conv_channels(k)
        conv_weight = _prefix(self.conv_weight, channels)
        conv_bias = _prefix(self.conv_bias, channels) if self.conv_bias is not None else None
        A = -torch.exp(_prefix(self.A_log, k).float())
        dt_bias = _prefix(self.dt_bias, k)
        out_proj_weight = _prefix(self.out_proj.weight, k * P, dim=1)
        if conv_state is None and resolve_impl("ssd", "auto", (u,)) == "triton":
            # CUDA: conv -> scan -> gated norm as one fused node that reads z, x, B, C and dt by
            # strides straight out of the in_proj output and writes its gradient once.
            from matmamba.ops.triton_common.mixer import mamba2_mixer_core_triton

            y = mamba2_mixer_core_triton(
                zxbcdt, conv_weight, conv_bias, dt_bias, A, self._D(k),
                _prefix(self.norm.weight, k * P), ngroups=self.ngroups, dstate=self.d_state, headdim=P,
                nheads_total=self.nheads, eps=self.norm.eps, norm_before_gate=self.norm_before_gate,
                dt_limit=self.dt_limit, seq_idx=seq_idx)
            return self.drop2(F.linear(y, out_proj_weight, self.out_proj.bias))

        z, x, BC, dt = self._split_projection(zxbcdt, k)
        xBC = torch.cat([BC, x.reshape(b, l, k * P)], dim=-1)
        conv_out = ops.causal_conv1d(
            xBC, conv_weight, conv_bias, activation="silu", seq_idx=seq_idx,
            return_final_state=conv_state is not None)
        if conv_state is not None:
            conv_out, conv_final = conv_out
            conv_state[:, :channels].copy_(conv_final)
        B = conv_out[..., :gn].unflatten(-1, (self.ngroups, self.d_state))
        C = conv_out[..., gn : 2 * gn].unflatten(-1, (self.ngroups, self.d_state))
        x = conv_out[..., 2 * gn :].unflatten(-1, (k, P))

        # The chunk size changes only rounding. The torch scan's cost per token grows with it, so on
        # the CPU a short chunk is several times faster (the Triton kernels pick their own chunk).
        chunk_size = self.chunk_size if u.is_cuda else min(self.chunk_size, CPU_CHUNK_SIZE)
        y = ops.ssd_scan(
            x, dt, A, B, C, chunk_size=chunk_size, D=self._D(k), dt_bias=dt_bias,
            dt_softplus=True, dt_limit=self.dt_limit, seq_idx=seq_idx,
            return_final_state=ssm_state is not None)
        if ssm_state is not None:
            y, ssm_final = y
            ssm_state[:, :k].copy_(ssm_final)
        y = self.norm(y.reshape(b, l, k * P), z.reshape(b, l, k * P))
        out = F.linear(y, out_proj_weight, self.out_proj.bias)
        return self.drop2(out)

    def _D(self, k: int) -> torch.Tensor:
        if self.D_has_hdim:
            return _prefix(self.D, k * self.headdim).view(k, self.headdim)
        return _prefix(self.D, k)

    # ----------------------------------------------------------------- decoding
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, dtype=None, **kwargs):
        """Full-width recurrent state; a width uses its prefix (channels and heads)."""
        device = self.in_proj.weight.device
        conv_dtype = dtype if dtype is not None else self.conv_weight.dtype
        conv_state = torch.zeros(batch_size, self._conv_channels(self.nheads), self.d_conv - 1,
                                 device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state,
                                device=device, dtype=torch.float32)
        return conv_state, ssm_state

    def _states_from_cache(self, inference_params: InferenceParams, batch_size: int):
        if self.layer_idx is None:
            raise ValueError("decoding with inference_params needs the block's layer_idx to be set")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, inference_params.max_seqlen)
        conv_state, ssm_state = cache[self.layer_idx]
        if conv_state.shape[0] < batch_size:
            raise ValueError(f"inference cache holds batch {conv_state.shape[0]}, got a batch of {batch_size}")
        return _prefix(conv_state, batch_size), _prefix(ssm_state, batch_size)

    def step(self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
             width: int | None = None, mrl_level: int | None = None) -> torch.Tensor:
        """One token: u (b, 1, d_model). Updates the width's prefix of both states in place."""
        return self._step(u, conv_state, ssm_state, self.resolve_heads(width, mrl_level))

    def _step(self, u, conv_state, ssm_state, k: int) -> torch.Tensor:
        b = u.shape[0]
        P, gn = self.headdim, self._gn
        rows = self._in_proj_rows(k)
        bias = _prefix(self.in_proj.bias, rows) if self.in_proj.bias is not None else None
        zxbcdt = F.linear(u[:, 0], _prefix(self.in_proj.weight, rows), bias)
        channels = self._conv_channels(k)
        conv_bias = _prefix(self.conv_bias, channels) if self.conv_bias is not None else None
        if self._fused_decode(u):
            # CUDA: conv update -> state update -> gated norm reading B, C, x, dt and z straight out
            # of the in_proj output (5 launches a block where the ops composed below take 11)
            from matmamba.ops.triton_common.mixer import mamba2_decode_core_triton

            y = mamba2_decode_core_triton(
                zxbcdt, _prefix(conv_state, channels, 1), _prefix(ssm_state, k, 1),
                _prefix(self.conv_weight, channels), conv_bias,
                _prefix(self.dt_bias, k), _prefix(self.A_log, k), self._D(k),
                _prefix(self.norm.weight, k * P), ngroups=self.ngroups, dstate=self.d_state,
                headdim=P, nheads_total=self.nheads, eps=self.norm.eps,
                norm_before_gate=self.norm_before_gate, dt_limit=self.dt_limit)
            return F.linear(y, _prefix(self.out_proj.weight, k * P, 1), self.out_proj.bias).unsqueeze(1)
        z, x, BC, dt = self._split_projection(zxbcdt, k)
        xBC = torch.cat([BC, x.reshape(b, k * P)], dim=-1)
        xBC = ops.causal_conv1d_update(
            xBC, _prefix(conv_state, channels, 1), _prefix(self.conv_weight, channels), conv_bias,
            activation="silu")
        B = xBC[:, :gn].unflatten(-1, (self.ngroups, self.d_state))
        C = xBC[:, gn : 2 * gn].unflatten(-1, (self.ngroups, self.d_state))
        x = xBC[:, 2 * gn :].unflatten(-1, (k, P))
        A = -torch.exp(self.A_log[:k].float())
        y = ops.ssd_state_update(_prefix(ssm_state, k, 1), x, dt, A, B, C, D=self._D(k),
                                 dt_bias=_prefix(self.dt_bias, k), dt_softplus=True, dt_limit=self.dt_limit)
        y = self.norm(y.reshape(b, k * P), z.reshape(b, k * P))
        out = F.linear(y, _prefix(self.out_proj.weight, k * P, 1), self.out_proj.bias)
        return out.unsqueeze(1)

    def _fused_decode(self, u: torch.Tensor) -> bool:
        """Whether a decode step takes the fused Triton core (``fused_inference_applies``: on CUDA,
        eagerly, outside autograd, unless ``ops.use_fused_inference(False)`` or
        ``MATMAMBA_FUSED_INFERENCE=0``); otherwise it composes the ops."""
        return fused_inference_applies("ssd", (u,), self.parameters())

    # ------------------------------------------------------------------ export
    def dense_state_dict(self, heads: int) -> dict[str, torch.Tensor]:
        """The weights of the first ``heads`` heads as a dense block (``MatMamba2(..., nheads=heads)``)."""
        k, P, gn, H = heads, self.headdim, self._gn, self.nheads
        if not 0 < k <= H:
            raise ValueError(f"heads must be in [1, {H}], got {heads}")
        rows = torch.cat([torch.arange(2 * gn + k), torch.arange(2 * gn + H, 2 * gn + H + 2 * k * P)])
        rows = rows.to(self.in_proj.weight.device)
        channels = self._conv_channels(k)
        sd = {"in_proj.weight": self.in_proj.weight.index_select(0, rows),
              "conv_weight": self.conv_weight[:channels], "dt_bias": self.dt_bias[:k], "A_log": self.A_log[:k],
              "D": self.D[: k * P] if self.D_has_hdim else self.D[:k], "norm.weight": self.norm.weight[: k * P],
              "out_proj.weight": self.out_proj.weight[:, : k * P]}
        if self.in_proj.bias is not None:
            sd["in_proj.bias"] = self.in_proj.bias.index_select(0, rows)
        if self.conv_bias is not None:
            sd["conv_bias"] = self.conv_bias[:channels]
        if self.out_proj.bias is not None:
            sd["out_proj.bias"] = self.out_proj.bias
        return {name: t.detach().clone() for name, t in sd.items()}

    # ----------------------------------------------------------------- counting
    def num_params(self, width: int | None = None) -> int:
        """Parameters of the dense block that width ``width`` is (what an export has)."""
        k = self.resolve_heads(width)
        P, gn, D = self.headdim, self._gn, self.d_model
        rows = 2 * gn + k + 2 * k * P
        n = rows * D + (rows if self.in_proj.bias is not None else 0)
        channels = self._conv_channels(k)
        n += channels * self.d_conv + (channels if self.conv_bias is not None else 0)
        n += 2 * k + (k * P if self.D_has_hdim else k)  # dt_bias, A_log, D
        n += k * P  # norm weight
        n += k * P * D + (D if self.out_proj.bias is not None else 0)
        return n

    def flops_per_token(self, width: int | None = None) -> int:
        """Forward FLOPs per token (multiply-add = 2): projections, conv, and the recurrence.

        The scan is counted in its recurrent form: per head, dt*B x^T (2PN), the decay (PN) and
        C h (2PN), i.e. 5PN per head per token. The chunked kernels do more (intra-chunk
        products), but this is the model's work, the number to compare submodels by.
        """
        k = self.resolve_heads(width)
        P, gn, D, N = self.headdim, self._gn, self.d_model, self.d_state
        proj = 2 * D * (2 * gn + k + 2 * k * P) + 2 * k * P * D
        conv = 2 * self._conv_channels(k) * self.d_conv
        scan = 5 * k * P * N + 2 * k * P  # + D skip
        norm_gate = 6 * k * P
        return proj + conv + scan + norm_gate

    # ----------------------------------------------------------- published layout
    def _published_index(self):
        """Index maps: internal row r of in_proj holds published row rows[r]; same for conv."""
        E, gn, H, P = self.d_inner, self._gn, self.nheads, self.headdim
        device = self.in_proj.weight.device
        heads = torch.arange(H, device=device).repeat_interleave(P) * P + torch.arange(P, device=device).repeat(H)
        z_rows, x_rows = heads.view(H, P), E + heads.view(H, P)
        rows = torch.cat([
            torch.arange(2 * E, 2 * E + 2 * gn, device=device),           # B, C
            torch.arange(2 * E + 2 * gn, 2 * E + 2 * gn + H, device=device),  # dt
            torch.stack([z_rows, x_rows], dim=1).reshape(-1),              # (z_h, x_h) per head
        ])
        conv = torch.cat([torch.arange(E, E + 2 * gn, device=device), torch.arange(E, device=device)])
        return rows, conv

    def published_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """State dict in the published MatMamba2 layout (mamba_ssm Mamba2 key names and row order)."""
        rows, conv = self._published_index()
        out = {}
        w = self.in_proj.weight.detach()
        out[prefix + "in_proj.weight"] = torch.empty_like(w).index_copy_(0, rows, w)
        if self.in_proj.bias is not None:
            b = self.in_proj.bias.detach()
            out[prefix + "in_proj.bias"] = torch.empty_like(b).index_copy_(0, rows, b)
        cw = self.conv_weight.detach()
        out[prefix + "conv1d.weight"] = torch.empty_like(cw).index_copy_(0, conv, cw).unsqueeze(1)
        if self.conv_bias is not None:
            cb = self.conv_bias.detach()
            out[prefix + "conv1d.bias"] = torch.empty_like(cb).index_copy_(0, conv, cb)
        for name in ("dt_bias", "A_log", "D"):
            out[prefix + name] = getattr(self, name).detach().clone()
        out[prefix + "norm.weight"] = self.norm.weight.detach().clone()
        out[prefix + "out_proj.weight"] = self.out_proj.weight.detach().clone()
        if self.out_proj.bias is not None:
            out[prefix + "out_proj.bias"] = self.out_proj.bias.detach().clone()
        return out

    def load_published_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a state dict in the published layout (see ``published_state_dict``)."""
        return self.load_state_dict(state_dict, strict=strict)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, headdim={self.headdim}, "
                f"nheads={self.nheads}, ngroups={self.ngroups}, expand={self.expand}, "
                f"widths={self.valid_widths()[0]}..{self.max_width} step {self.valid_widths()[0]}")


def _convert_published_on_load(module: MatMamba2, state_dict, prefix, local_metadata, strict,
                               missing_keys, unexpected_keys, error_msgs):
    """Accept the published layout in load_state_dict: convert its keys and row order in place."""
    if prefix + "conv1d.weight" not in state_dict:
        return
    rows, conv = module._published_index()
    rows, conv = rows.to(state_dict[prefix + "in_proj.weight"].device), conv.to(state_dict[prefix + "conv1d.weight"].device)
    expected = module.in_proj.weight.shape[0]
    w = state_dict[prefix + "in_proj.weight"]
    if w.shape[0] != expected:
        error_msgs.append(f"{prefix}in_proj.weight has {w.shape[0]} rows; this block "
                          f"(d_model={module.d_model}, headdim={module.headdim}, d_state={module.d_state}, "
                          f"ngroups={module.ngroups}) expects {expected}: the checkpoint was made with another config")
        return
    state_dict[prefix + "in_proj.weight"] = w.index_select(0, rows)
    if prefix + "in_proj.bias" in state_dict:
        state_dict[prefix + "in_proj.bias"] = state_dict[prefix + "in_proj.bias"].index_select(0, rows)
    cw = state_dict.pop(prefix + "conv1d.weight")
    state_dict[prefix + "conv_weight"] = cw.reshape(cw.shape[0], -1).index_select(0, conv)
    if prefix + "conv1d.bias" in state_dict:
        state_dict[prefix + "conv_bias"] = state_dict.pop(prefix + "conv1d.bias").index_select(0, conv)
