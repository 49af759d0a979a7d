"""The nested MatMamba2 block against the published math, written from the equations."""

import pytest
import torch

from matmamba import MatMamba2
from matmamba.models.block import InferenceParams
from published_reference import block_forward

D_MODEL, HEADDIM, D_STATE = 48, 8, 8  # 12 heads; widths are multiples of 4


def make_block(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_state": D_STATE, "headdim": HEADDIM, "chunk_size": 16, **kw}
    block = MatMamba2(D_MODEL, **kw).double()
    with torch.no_grad():  # move every parameter off its init so no term hides (D=1, zero biases...)
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("width", [48, 24, 20, 12, 4])  # 12, 6, 5 (odd), 3 (odd), 1 heads
@pytest.mark.parametrize("seqlen", [1, 37])
def test_width_equals_plain_mamba2_from_sliced_weights(width, seqlen):
    block = make_block(seed=width + seqlen)
    u = torch.randn(2, seqlen, D_MODEL, dtype=torch.float64)
    ours = block(u, width=width)
    ref = block_forward(block.published_state_dict(), u, width, d_state=D_STATE, headdim=HEADDIM)
    assert rel_err(ours, ref) < 1e-8


def test_published_switches_reach_the_same_width():
    block = make_block()
    u = torch.randn(2, 20, D_MODEL, dtype=torch.float64)
    y_width = block(u, width=24)
    assert torch.equal(block(u, mrl_level=2), y_width)
    block.mixnmatch, block.mixnmatch_dims = True, 24
    assert torch.equal(block(u), y_width)
    assert torch.equal(block(u, mrl_level=4), y_width), "mixnmatch overrides mrl_level, as published"
    y_full_explicit = block(u, width=48)  # an explicit width= wins over the attributes
    block.mixnmatch = False
    assert torch.equal(block(u), y_full_explicit)
    assert not torch.equal(y_full_explicit, y_width)


@pytest.mark.parametrize("width", [20, 4])
def test_parameters_outside_the_slice_get_zero_gradient(width):
    block = make_block(bias=True)
    u = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    block(u, width=width).pow(2).sum().backward()
    k = 2 * width // HEADDIM
    P, GN, H = HEADDIM, D_STATE, block.nheads
    used_rows = 2 * GN + H + 2 * k * P
    g = {n: p.grad for n, p in block.named_parameters()}
    assert g["in_proj.weight"][used_rows:].abs().max() == 0
    assert g["in_proj.weight"][2 * GN + k : 2 * GN + H].abs().max() == 0, "dt rows of unused heads"
    assert g["in_proj.bias"][used_rows:].abs().max() == 0
    assert g["conv_weight"][2 * GN + k * P :].abs().max() == 0
    assert g["conv_bias"][2 * GN + k * P :].abs().max() == 0
    for name in ("dt_bias", "A_log", "D"):
        assert g[name][k:].abs().max() == 0
        assert g[name][:k].abs().min() > 0
    assert g["norm.weight"][k * P :].abs().max() == 0
    assert g["out_proj.weight"][:, k * P :].abs().max() == 0
    used = torch.cat([torch.arange(2 * GN + k), torch.arange(2 * GN + H, used_rows)])
    assert g["in_proj.weight"][used].abs().sum(1).min() > 0, "every row a width uses gets a gradient"


def test_every_parameter_gets_a_gradient_at_full_width():
    block = make_block(bias=True)
    u = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    block(u).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        per_row = p.grad.abs().reshape(p.shape[0], -1).sum(1) if p.dim() else p.grad.abs()
        assert (per_row > 0).all(), f"{name} has rows with zero gradient at full width"


def test_published_layout_round_trip_is_lossless():
    block = make_block(bias=True)
    sd = block.published_state_dict()
    assert sd["in_proj.weight"].shape == (2 * 2 * D_MODEL + 2 * D_STATE + block.nheads, D_MODEL)
    assert sd["conv1d.weight"].shape == (2 * D_MODEL + 2 * D_STATE, 1, 4)
    fresh = make_block(seed=1, bias=True)
    fresh.load_published_state_dict(sd)
    for (n, a), (_, b) in zip(block.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    again = fresh.published_state_dict()
    assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd)


@pytest.mark.parametrize("width", [48, 20])
def test_step_by_step_decoding_reproduces_the_forward_pass(width):
    block = make_block(layer_idx=0)
    u = torch.randn(2, 21, D_MODEL, dtype=torch.float64)
    full = block(u, width=width)
    params = InferenceParams(max_seqlen=21, max_batch_size=2)
    prompt = 9
    outs = [block(u[:, :prompt], width=width, inference_params=params)]
    params.seqlen_offset = prompt
    for t in range(prompt, 21):
        outs.append(block(u[:, t : t + 1], width=width, inference_params=params))
        params.seqlen_offset += 1
    assert rel_err(torch.cat(outs, 1), full) < 1e-8


@pytest.mark.parametrize("bad", [0, 3, 50, -4, 2.0, "24"])
def test_invalid_width_names_the_valid_ones(bad):
    block = make_block()
    with pytest.raises(ValueError, match=r"[Vv]alid widths.*multiples of 4"):
        block(torch.randn(1, 4, D_MODEL, dtype=torch.float64), width=bad)


def test_bad_inputs_say_what_is_expected():
    block = make_block()
    with pytest.raises(ValueError, match=r"\(batch, seqlen, d_model=48\)"):
        block(torch.randn(4, D_MODEL, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"d_model=48"):
        block(torch.randn(1, 4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        block(torch.ones(1, 4, D_MODEL, dtype=torch.long))
    with pytest.raises(ValueError, match="mrl_level"):
        block(torch.randn(1, 4, D_MODEL, dtype=torch.float64), mrl_level=5)
    with pytest.raises(ValueError, match="headdim"):
        MatMamba2(48, headdim=7)


def test_block_counts_match_the_dense_block_it_is():
    block = make_block(bias=True)
    assert block.num_params() == sum(p.numel() for p in block.parameters())
    k, P, GN, D = 5, HEADDIM, D_STATE, D_MODEL
    rows = 2 * GN + k + 2 * k * P
    expected = rows * D + rows + (2 * GN + k * P) * 5 + 3 * k + k * P + k * P * D + D
    assert block.num_params(20) == expected
    assert block.flops_per_token(4) < block.flops_per_token(24) < block.flops_per_token(48)
