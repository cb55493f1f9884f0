"""cpu_kernels.py's decode attention against PyTorch's scaled_dot_product_attention, on caches of
random keys and values: lanes of different lengths, several new tokens a lane (more than one
pass of nine), none, grouped kv heads, and rows that end off a vector's width."""
import pytest
import torch
import torch.nn.functional as F

import cpu_kernels

needs_attend = pytest.mark.skipif(not cpu_kernels.attends('cpu', torch.float32, 32),
                                  reason='needs the C loops built, on a CPU with AVX-512')


def reference(q, k, v, lengths, n_new):
    """Each lane's queries at positions lengths[b] + s over keys 0..that position."""
    S = q.size(2)
    positions = (lengths[:, None] + torch.arange(S)).clamp(max=k.size(2) - 1)  # (B, S); past n_new: unused
    context = int(positions.max()) + 1
    mask = (torch.arange(context)[None, None, :] <= positions[:, :, None])[:, None]
    return F.scaled_dot_product_attention(q, k[:, :, :context], v[:, :, :context], attn_mask=mask,
                                          enable_gqa=True)


@needs_attend
@pytest.mark.parametrize('heads,kv_heads,max_len', [(2, 2, 64), (4, 2, 90), (6, 3, 37)])
def test_attend_is_pytorchs_attention(heads, kv_heads, max_len):
    torch.manual_seed(heads + max_len)
    B, S = 7, 12
    k = torch.randn(B + 2, kv_heads, max_len, 32)  # two rows no lane reads
    v = torch.randn(B + 2, kv_heads, max_len, 32)
    rows = torch.tensor([8, 0, 3, 1, 2, 7, 5])    # lane b's cache row
    n_new = torch.tensor([12, 1, 9, 0, 10, 3, 1])
    lengths = torch.tensor([0, max_len - 1, 20, 5, max_len - 12, 1, 30])
    q = torch.randn(B, heads, S, 32)
    out = cpu_kernels.attend(q, k.transpose(2, 3).contiguous(), v, rows, lengths, n_new)
    expected = reference(q, k[rows], v[rows], lengths, n_new)
    for b in range(B):
        n = int(n_new[b])
        torch.testing.assert_close(out[b, :, :n], expected[b, :, :n], rtol=1e-5, atol=2e-6)
