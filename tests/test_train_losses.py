"""The chunked LM head + cross-entropy against the plain head, and its use in training."""

import pytest
import torch
import torch.nn.functional as F

from matmamba import create_model
from matmamba.training import LanguageModelModule
from matmamba.training.losses import (
    LMHeadInput,
    chunked_lm_cross_entropy,
    distillation_kl,
    lm_cross_entropy,
)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_matches_the_plain_head(chunk):
    torch.manual_seed(chunk)
    hidden = torch.randn(3, 13, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 40, (3, 13))
    plain = F.cross_entropy((hidden @ weight.T).flatten(0, 1), target.flatten())
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_lm_cross_entropy(LMHeadInput(hidden, weight), target, chunk)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_chunked, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_cross_entropy_rejects_bad_input():
    head = LMHeadInput(torch.randn(2, 3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="positive"):
        chunked_lm_cross_entropy(head, torch.zeros(2, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="targets"):
        chunked_lm_cross_entropy(head, torch.zeros(2, 4, dtype=torch.long), 2)


def test_lm_module_head_chunk_gives_the_same_loss_and_gradients():
    """A training step's loss and every parameter gradient, chunked head vs plain, on lm_tiny
    (tied embedding and head) at two widths; the chunk does not divide the token count."""
    tokens = torch.randint(0, 61, (2, 20))
    grads = {}
    for head_chunk in (None, 7):
        torch.manual_seed(0)
        module = LanguageModelModule("lm_tiny", head_chunk=head_chunk)
        inputs, target = module.split_batch(tokens, training=True)
        total = sum(module.task_loss(module.train_forward(inputs, w), target) for w in module.widths[:2])
        total.backward()
        grads[head_chunk] = (total.detach(), {n: p.grad.clone() for n, p in module.named_parameters()
                                               if p.grad is not None})
    (loss_a, g_a), (loss_b, g_b) = grads[None], grads[7]
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert g_a.keys() == g_b.keys() and len(g_a) > 5
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_head_chunk_config_errors():
    with pytest.raises(ValueError, match="head_chunk must be a positive"):
        LanguageModelModule("lm_tiny", head_chunk=0)
    with pytest.raises(ValueError, match="distill"):
        LanguageModelModule("lm_tiny", head_chunk=16, distill={"weight": 0.5})
    with pytest.raises(ValueError, match="compile"):
        LanguageModelModule("lm_tiny", head_chunk=16, compile=True)


def test_hidden_states_feed_the_head():
    torch.manual_seed(1)
    model = create_model("lm_tiny")
    ids = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(model.lm_head(model.hidden_states(ids, width=32)), model(ids, width=32).logits)


def test_chunked_cross_entropy_under_bf16_autocast():
    torch.manual_seed(2)
    hidden = torch.randn(2, 33, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    target = torch.randint(0, 50, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), target.flatten())
        chunked = chunked_lm_cross_entropy(LMHeadInput(hidden, weight), target, 16)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)  # same bf16 GEMM, fp32 softmax


def test_compiled_token_loss_matches_float64_in_value_and_gradient():
    """With model.compile on, the LM module's token loss runs compiled (inductor, here its CPU
    backend): on 16-bit logits it gives the float64 cross-entropy's value and gradient to the
    16-bit rounding of the gradient, in training and under no_grad (validation)."""
    torch.manual_seed(3)
    module = LanguageModelModule("lm_tiny", compile=True)
    module.net.compile = lambda **kw: None  # this test is about the loss: keep the network eager
    module.configure_model()
    assert module.token_loss is not lm_cross_entropy
    logits = (torch.randn(2, 9, 61) * 3).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 61, (2, 9))
    loss = module.task_loss(logits, target)
    loss.backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten())
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-2, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(module.token_loss(logits, target), loss.detach())
    compiled = module.token_loss
    module.configure_model()  # called again (fit, then validate): compiled once
    assert module.token_loss is compiled


def test_token_loss_is_eager_without_compile():
    module = LanguageModelModule("lm_tiny")
    module.configure_model()
    assert module.token_loss is lm_cross_entropy


def test_compiled_distillation_kl_matches_eager():
    """With model.compile and distillation on, the LM module's KL term runs compiled and gives the
    eager float64 value and student gradient (to bf16 rounding); without distillation it stays
    eager (nothing to compile)."""
    torch.manual_seed(4)
    module = LanguageModelModule("lm_tiny", compile=True, distill={"weight": 0.5, "temperature": 2.0})
    module.net.compile = lambda **kw: None  # keep the network eager: this test is about the loss
    module.configure_model()
    assert module.distill_kl is not distillation_kl
    student = (torch.randn(2, 7, 61) * 2).to(torch.bfloat16).requires_grad_()
    teacher = (torch.randn(2, 7, 61) * 2).to(torch.bfloat16)
    kd = module.distill_loss(student, teacher)
    kd.backward()
    ref_student = student.detach().double().requires_grad_()
    ref = distillation_kl(ref_student, teacher.double(), 2.0)
    ref.backward()
    torch.testing.assert_close(kd.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-2, atol=1e-5)
    plain = LanguageModelModule("lm_tiny", compile=True)
    plain.net.compile = lambda **kw: None
    plain.configure_model()
    assert plain.distill_kl is distillation_kl


def test_compile_allows_a_graph_per_width_and_grad_mode(monkeypatch):
    """Each width compiles its own graph in training, under no_grad and under inference_mode:
    configure_model raises dynamo's recompile limit to hold them all (at dynamo's default of 8,
    lm_pydoc's final validation fell back to eager)."""
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)
    module = LanguageModelModule("lm_tiny", compile=True)
    module.net.compile = lambda **kw: None
    module.configure_model()
    assert len(module.widths) == 4 and dynamo_config.recompile_limit >= 3 * 4
    monkeypatch.setattr(dynamo_config, "recompile_limit", 64)
    big = LanguageModelModule("lm_tiny", compile=True)
    big.net.compile = lambda **kw: None
    big.configure_model()
    assert dynamo_config.recompile_limit == 64  # never lowered
