"""MatMamba-LM: a causal language model of nested MatMamba2 blocks (the mamba_ssm MambaLMHeadModel shape).

embedding -> n_layer residual MatMamba2 blocks (RMSNorm, residual in fp32) -> RMSNorm -> head tied
to the embedding. The vocabulary is padded to a multiple of ``pad_vocab_size_multiple``.
Decoding runs from a recurrent state (conv and SSM state per layer) at any width or per-layer mix.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import torch
import torch.nn as nn

from matmamba.models.block import InferenceParams, MatMamba2
from matmamba.models.common import ConfigBase, NestedModelMixin, ResidualBlock, RMSNorm, rescale_out_proj_

CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


@dataclasses.dataclass
class MatMambaConfig(ConfigBase):
    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int | None = None  # None: d_model // 32, as published
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    d_intermediate: int = 0
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # accepted for compatibility; the math is the same either way
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    widths: list[int] | None = None  # the widths trained jointly (default D, D/2, D/4, D/8)
    layer_nheads: list[int] | None = None  # heads per layer of an exported dense submodel (None: all)

    def __post_init__(self):
        self._check_block_shape()
        if self.d_intermediate:
            raise ValueError("d_intermediate > 0 (an MLP after each mixer) is not supported; use 0")
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        self.dt_limit = tuple(self.dt_limit)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m


class MixerModel(nn.Module):
    def __init__(self, config: MatMambaConfig, device=None, dtype=None):
        super().__init__()
        c, factory = config, {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(c.padded_vocab_size, c.d_model, **factory)
        norm_cls = RMSNorm if c.rms_norm else nn.LayerNorm
        self.layers = nn.ModuleList(
            ResidualBlock(c.d_model, MatMamba2(c.d_model, layer_idx=i, **c.block_kwargs(i), **factory),
                          norm_cls(c.d_model, eps=c.norm_epsilon, **factory),
                          residual_in_fp32=c.residual_in_fp32)
            for i in range(c.n_layer))
        self.norm_f = norm_cls(c.d_model, eps=c.norm_epsilon, **factory)

    def forward(self, input_ids, layer_kwargs, inference_params=None):
        hidden, residual = self.embedding(input_ids), None
        for layer, kw in zip(self.layers, layer_kwargs):
            hidden, residual = layer(hidden, residual, inference_params=inference_params, **kw)
        residual = hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


class MatMambaLMHeadModel(NestedModelMixin, nn.Module):
    config_class = MatMambaConfig
    model_type = "matmamba_lm"

    def __init__(self, config: MatMambaConfig | None = None, device=None, dtype=None, **kwargs):
        super().__init__()
        if config is None:
            config = MatMambaConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.backbone = MixerModel(c, device=device, dtype=dtype)
        self.lm_head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.backbone.embedding.weight, std=c.initializer_range)
        rescale_out_proj_(self, c.n_layer)
        if c.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @property
    def layers(self):
        return self.backbone.layers

    def forward(self, input_ids: torch.Tensor, width=None, mrl_level=None, inference_params=None,
                num_last_tokens: int = 0, position_ids=None, **ignored) -> CausalLMOutput:
        """input_ids (b, l) -> CausalLMOutput(logits (b, l, padded_vocab)).

        ``width``: an int for every layer or one width per layer; ``mrl_level``: width = d_model/m.
        ``num_last_tokens > 0`` computes logits for the last tokens only.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, seqlen), "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling() and input_ids.numel() and (
                int(input_ids.max()) >= self.config.padded_vocab_size or int(input_ids.min()) < 0):
            raise ValueError(f"token ids must lie in [0, {self.config.padded_vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        hidden = self.hidden_states(input_ids, width, mrl_level, inference_params)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden))

    def hidden_states(self, input_ids: torch.Tensor, width=None, mrl_level=None, inference_params=None):
        """The final-norm hidden states (b, l, d_model) that ``lm_head`` maps to logits (training
        with a chunked head + loss reads these, so the full logits never exist at once)."""
        return self.backbone(input_ids, self._layer_kwargs(width, mrl_level), inference_params=inference_params)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
                for i, layer in enumerate(self.layers)}

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, width=None, mrl_level=None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool = False) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``input_ids`` from the recurrent state.

        The prompt runs once through the chunked scan, which leaves each layer's conv and SSM
        state; every new token is one recurrent step. ``temperature=0`` is greedy; ``top_k`` and
        ``top_p`` restrict sampling. Returns (b, l + new) token ids (generation stops early only
        when every row has produced ``eos_token_id``).

        ``cuda_graph=True`` (CUDA only) captures the one-token step once after the prompt and
        replays it for every new token. A step is ~7 small launches per layer, so in eager mode
        the host, not the GPU, sets the pace (LM-130M at batch 1 on an H100: 7.8 ms eager, 0.67 ms
        replayed; docs/performance.md, session 24).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        b, l = input_ids.shape
        params = InferenceParams(max_seqlen=l + max_new_tokens, max_batch_size=b)
        params.key_value_memory_dict = self.allocate_inference_cache(b, l + max_new_tokens)
        if cuda_graph and input_ids.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device, got {input_ids.device}")
        tokens, finished = [input_ids], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        step_input = input_ids
        replay = None
        for _ in range(max_new_tokens):
            if replay is not None:
                logits = replay(step_input)
            else:
                logits = self(step_input, width=width, mrl_level=mrl_level, inference_params=params,
                              num_last_tokens=1).logits[:, -1, : self.config.vocab_size]
            params.seqlen_offset += step_input.shape[1]
            if cuda_graph and replay is None:
                # After the prompt every step takes the same path (seqlen_offset > 0, one token),
                # reading and updating the cached states in place: safe to capture once.
                replay = self._capture_decode_step(b, width, mrl_level, params)
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
        return torch.cat(tokens, dim=1)

    def _capture_decode_step(self, batch_size: int, width, mrl_level, params: InferenceParams):
        """Capture ``tokens (b, 1) -> logits (b, vocab)`` of one decode step in a CUDA graph.

        Warm-up runs on a side stream would advance the recurrent states, so they run on a copy
        of the cache that the captured graph never sees; the graph itself reads and writes the
        real cache tensors in place.
        """
        static_tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.lm_head.weight.device)
        real_cache = params.key_value_memory_dict
        params.key_value_memory_dict = {k: tuple(t.clone() for t in v) for k, v in real_cache.items()}

        def step():
            return self(static_tokens, width=width, mrl_level=mrl_level, inference_params=params,
                        num_last_tokens=1).logits[:, -1, : self.config.vocab_size]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # first calls compile/initialise kernels outside the capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        params.key_value_memory_dict = real_cache
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = step()

        def replay(tokens: torch.Tensor) -> torch.Tensor:
            static_tokens.copy_(tokens)
            graph.replay()
            return static_logits.clone()

        return replay

    # ---------------------------------------------------------------- counting
    def num_params(self, width=None, non_embedding: bool = False) -> int:
        """Parameters of the dense submodel at ``width`` (the tied head counted once)."""
        n = self._layers_params(width) + sum(p.numel() for p in self.backbone.norm_f.parameters())
        if not non_embedding:
            n += self.backbone.embedding.weight.numel()
            if not self.config.tie_embeddings:
                n += self.lm_head.weight.numel()
        return n

    def flops_per_token(self, width=None) -> int:
        """Forward FLOPs per token: the blocks and the output head."""
        blocks = sum(layer.mixer.flops_per_token(w) for layer, w in zip(self.layers, self._block_widths(width)))
        return blocks + 2 * self.config.d_model * self.config.padded_vocab_size

    # ------------------------------------------------------------ checkpoints
    def _prepare_state_dict(self, sd):
        if self.config.tie_embeddings and "lm_head.weight" not in sd and "backbone.embedding.weight" in sd:
            sd["lm_head.weight"] = sd["backbone.embedding.weight"]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(self._prepare_state_dict(dict(state_dict)), strict=strict, assign=assign)

    def _state_dict_for_save(self):
        sd = self.published_state_dict()
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)  # safetensors stores no aliases; re-tied on load
        return sd


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (b, vocab) -> token ids (b,). temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
