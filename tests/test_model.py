import math

import pytest
import torch

from agdlm.model import GPT, GPTConfig


def tiny(**kw):
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, **kw)


def test_shapes_and_loss():
    model = GPT(tiny())
    idx = torch.randint(0, 97, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 97)
    assert loss.shape == () and abs(loss.item() - math.log(97)) < 1.0
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 97) and loss is None


def test_nanogpt_parameter_names():
    names = set(dict(GPT(tiny(bias=True)).named_parameters()))
    for expected in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                     "transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.weight",
                     "transformer.h.0.ln_1.weight", "transformer.ln_f.bias"):
        assert expected in names


def test_causal_masking():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_weight_tying():
    tied = GPT(tiny())
    assert tied.transformer.wte.weight is tied.lm_head.weight
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_sequence_longer_than_block_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.long))


def test_flops_and_mfu():
    model = GPT(tiny())
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 2 * 16 * 16
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000 / 1e12)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = GPT(tiny())
    ckpt = GPT(tiny(activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    for m in (plain, ckpt):
        m(idx, idx)[1].backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
