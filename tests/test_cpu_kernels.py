"""cpu_kernels.py's decode attention against model.py's rotation and PyTorch's
scaled_dot_product_attention, on caches of random keys and values: heads of 32 and 64, lanes of
different lengths, several new tokens a lane (more than one pass of a chunk), none, grouped kv
heads, and rows that end off a vector's width."""
import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
from model import apply_rope, rope_table

needs_attend = pytest.mark.skipif(not cpu_kernels.attends('cpu', torch.float32, 32),
                                  reason='needs the C loops built, on a CPU with AVX-512')


def reference(q, k, v, cos, sin, k_cache, v_cache, rows, lengths, n_new):
    """model.py's way: rotate, write the cache rows, then each lane's queries over keys up to
    their own positions -> (out (N, heads * 32), the caches written)."""
    hd = v_cache.size(3)
    N, heads, kv_heads = q.size(0), q.size(1) // hd, k.size(1) // hd
    q = apply_rope(q.view(N, heads, hd), cos[:, None], sin[:, None])
    k = apply_rope(k.view(N, kv_heads, hd), cos[:, None], sin[:, None])
    lane = torch.repeat_interleave(torch.arange(len(n_new)), n_new)
    pos = lengths[lane] + torch.arange(N) - (n_new.cumsum(0) - n_new)[lane]
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[rows[lane], :, pos] = k
    v_cache[rows[lane], :, pos] = v.view(N, kv_heads, hd)
    out = torch.empty(N, heads, hd)
    for t in range(N):
        keys, values = k_cache[rows[lane[t]], :, :pos[t] + 1], v_cache[rows[lane[t]], :, :pos[t] + 1]
        out[t] = F.scaled_dot_product_attention(q[t][:, None], keys, values, enable_gqa=True)[:, 0]
    return out.view(N, heads * hd), k_cache, v_cache


@needs_attend
@pytest.mark.parametrize('heads,kv_heads,max_len,hd', [(2, 2, 64, 32), (4, 2, 90, 32), (6, 3, 37, 32),
                                                       (9, 3, 50, 64), (2, 2, 40, 64)])  # 64: SmolLM2's
def test_attend_is_rope_then_pytorchs_attention(heads, kv_heads, max_len, hd):
    torch.manual_seed(heads + max_len)
    k_cache = torch.randn(9, kv_heads, max_len, hd)  # two rows no lane reads
    v_cache = torch.randn(9, kv_heads, max_len, hd)
    rows = torch.tensor([8, 0, 3, 1, 2, 7, 5])    # lane b's cache row
    n_new = torch.tensor([12, 1, 9, 0, 10, 3, 1])
    lengths = torch.tensor([0, max_len - 1, 20, 5, max_len - 12, 1, 30])
    N = int(n_new.sum())
    q, k, v = torch.randn(N, heads * hd), torch.randn(N, kv_heads * hd), torch.randn(N, kv_heads * hd)
    lane = torch.repeat_interleave(torch.arange(7), n_new)
    pos = lengths[lane] + torch.arange(N) - (n_new.cumsum(0) - n_new)[lane]
    cos, sin = (table[pos] for table in rope_table(hd, max_len, 10000.0))
    expected, k_expected, v_expected = reference(q, k, v, cos, sin, k_cache, v_cache, rows, lengths, n_new)
    k_tiles = torch.empty(cpu_kernels.key_tiles_shape(9, kv_heads, max_len, hd))
    inputs = q.clone(), k.clone(), v.clone()
    tiles = lambda keys: F.pad(keys, (0, 0, 0, 16 * k_tiles.size(2) - max_len)).unflatten(2, (-1, 16)).transpose(3, 4)
    k_tiles.copy_(tiles(k_cache))
    out = cpu_kernels.attend(q, k, v, cos, sin, k_tiles, v_cache, rows, lengths, n_new)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(k_tiles, tiles(k_expected), rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, v_expected)  # written where the new tokens go, and nowhere else
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), inputs))  # the inputs are left as they were


@needs_attend
@pytest.mark.parametrize('rows,width', [(1, 64), (37, 72), (3000, 64)])  # 72: a row ending off a vector
def test_the_rest_of_a_step_is_model_pys_math(rows, width):
    import model
    torch.manual_seed(rows)
    x, residual, weight = torch.randn(rows, width), torch.randn(rows, width), torch.randn(width)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), model.rms_norm(x, weight, 1e-5))
    for ours, theirs in zip(cpu_kernels.add_rms_norm(x, residual, weight, 1e-5),
                            model.add_rms_norm(x, residual, weight, 1e-5)):
        torch.testing.assert_close(ours, theirs)
    a = torch.cat([torch.linspace(-100, 100, 4 * width)[None], 5 * torch.randn(rows, 4 * width)])
    b = torch.randn_like(a)
    torch.testing.assert_close(cpu_kernels.swiglu(a, b), model.swiglu(a, b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu_kernels.swiglu(a[:, :-3], b[:, :-3]), model.swiglu(a[:, :-3], b[:, :-3]),
                               rtol=1e-5, atol=1e-6)  # strided, and not a whole vector at the end


@needs_attend
@pytest.mark.parametrize('rows,width', [(1, 2), (5, 17), (4700, 260), (3, 49152)])
def test_argmax_is_torchs(rows, width):
    """The same index as torch.argmax: the first of tied maxima, the first NaN, a row of -inf."""
    torch.manual_seed(width)
    x = torch.randn(rows, width)
    x[0, width // 2:] = x[0].max() + 1  # ties: the first of them
    if rows > 2:
        x[1, -1] = float('nan')
        x[1, width // 3] = float('nan')  # NaNs: the first of them, wherever the largest is
        x[2] = float('-inf')
    assert torch.equal(cpu_kernels.argmax(x), x.argmax(-1))
    assert torch.equal(cpu_kernels.argmax(x[:, :-1]), x[:, :-1].argmax(-1))  # strided rows


@needs_attend
@pytest.mark.parametrize('rows', [1, 5, 6, 7, 32, 64, 65, 200])
def test_linear_rows_is_a_linear_layer(rows):
    """linear_rows against nn.Linear: rows off the blocks of 6 and off the chunks of 64, weights
    whose rows are not a multiple of 4; and which layers it takes (a pretrained model's prefill
    and decode, not training, not the paper's small weights)."""
    torch.manual_seed(rows)
    for out_features, in_features in ((203, 576), (577, 1536), (4096, 64)):
        layer = torch.nn.Linear(in_features, out_features, bias=False)
        x = torch.randn(rows, in_features)
        with torch.no_grad():
            assert cpu_kernels.serves_linear(x, layer)
            torch.testing.assert_close(cpu_kernels.linear_rows(x, layer.weight), layer(x), rtol=1e-5, atol=1e-5)
    assert not cpu_kernels.serves_linear(x, layer)  # autograd on
    with torch.no_grad():
        assert not cpu_kernels.serves_linear(torch.randn(rows, 64), torch.nn.Linear(64, 256, bias=False))  # small
        assert not cpu_kernels.serves_linear(torch.randn(rows, 72), torch.nn.Linear(72, 4096, bias=False))  # K % 16
