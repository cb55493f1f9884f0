"""triton_kernels.py against the PyTorch references in model.py: output, dX and dW of every Triton op.

On a GPU the kernels compile and the float32 tests run on CUDA tensors, plus bf16 tests at real
sizes. Without one (CI), Triton's interpreter runs them in numpy on CPU tensors. That needs
TRITON_INTERPRET=1 before triton is first imported: triton builds its own helpers (tl.sum,
tl.sigmoid...) for the interpreter or the compiler then, once per process. So this module sets
it before importing model, and takes it out again right after, with kernels.INTERPRET (which
sends model.py's CPU tensors to Triton) on only during these tests: the rest of the suite keeps
the PyTorch path on CPU. If an earlier test module already imported triton for the compiler,
these tests run in a fresh process instead (test_in_a_fresh_interpreter_process).
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
_SET_HERE = not ON_GPU and 'triton' not in sys.modules and 'TRITON_INTERPRET' not in os.environ
if _SET_HERE:
    os.environ['TRITON_INTERPRET'] = '1'
try:
    import model
    triton = pytest.importorskip('triton', reason='Triton is not installed: PyTorch is all there is')
    kernels = pytest.importorskip('triton_kernels', reason='triton_kernels.py does not import')
finally:
    if _SET_HERE:
        del os.environ['TRITON_INTERPRET']
if _SET_HERE:  # triton_kernels.py read the variable at import: on for this module's tests only
    kernels.INTERPRET = False
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETED = isinstance(triton.language.sum, InterpretedFunction)  # how triton was imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = dict(rtol=1e-5, atol=1e-5)      # float32, summed in another order than PyTorch's
F32_SUM = dict(rtol=1e-4, atol=1e-4)  # float32 gradients reduced over every row (dW)
BF16 = dict(rtol=1.6e-2, atol=1e-2)       # one bf16 rounding of O(1) values
BF16_SUM = dict(rtol=1.6e-2, atol=2e-1)   # bf16 gradients reduced over 8k rows (dW)


@pytest.fixture
def device(monkeypatch):
    """Where the float32 tests run: CUDA, or the CPU through Triton's interpreter."""
    if ON_GPU:
        return 'cuda'
    if not INTERPRETED:
        pytest.skip('triton was imported for the compiler before this module: '
                    'test_in_a_fresh_interpreter_process runs these tests')
    monkeypatch.setenv('TRITON_INTERPRET', '1')  # triton reads it again as it imports lazily
    monkeypatch.setattr(kernels, 'INTERPRET', True)  # model.py: CPU tensors go to Triton too
    return 'cpu'


@pytest.fixture
def cuda():
    if not ON_GPU:
        pytest.skip('needs CUDA')
    return torch.device('cuda')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty and empty_like hand out NaN-filled tensors, so an output element that a kernel
    forgets to write fails the comparison instead of passing on leftover memory."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float('nan')) if t.is_floating_point() else t
    torch.empty = lambda *a, **k: poison(empty(*a, **k))  # noqa: E731
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def run(fn, inputs, poison=False):
    """-> outputs of fn(*inputs) and the grads of the inputs that require them, after a backward
    with fixed random output gradients (seeded: the same for kernel and reference)."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
              for t in inputs]
    with poisoned_empty() if poison else contextlib.nullcontext():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
        torch.autograd.backward(outs, grads)
    return outs, [t.grad for t in inputs if torch.is_tensor(t) and t.requires_grad]


def assert_match(got, want, tol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{what} #{i}: {m}")


# ----------------------------------------------------------------------------------------------
# One op at a time, float32

# the backward's 4 CPU programs take 2 rows each of 5 (the last takes none) and 4 of 13 (the
# last takes one); 1000 columns pad a 1024 block; a transposed input is not contiguous
@pytest.mark.parametrize('shape, transpose', [((1, 8), False), ((5, 123), False),
                                              ((13, 24), True), ((2, 3, 1000), False)])
def test_rms_norm(device, shape, transpose):
    x = torch.randn(shape, device=device)
    x = x.transpose(0, 1).contiguous().transpose(0, 1) if transpose else x
    w = 1 + 0.1 * torch.randn(shape[-1], device=device)
    x.requires_grad_(), w.requires_grad_()
    (y,), (dx, dw) = run(kernels.rms_norm, (x, w, 1e-5), poison=True)
    (y_ref,), (dx_ref, dw_ref) = run(model.rms_norm, (x, w, 1e-5))
    assert_match([y, dx], [y_ref, dx_ref], F32, 'y, dx')
    assert_match([dw], [dw_ref], F32_SUM, 'dw')


@pytest.mark.parametrize('shape', [(5, 123), (3, 7, 24)])
def test_add_rms_norm(device, shape):
    x, r = (torch.randn(shape, device=device, requires_grad=True) for _ in 'xr')
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).requires_grad_()

    def reference(x, r, w, eps):
        s = x + r
        return s, model.rms_norm(s, w, eps)
    (s, y), grads = run(kernels.add_rms_norm, (x, r, w, 1e-5), poison=True)
    (s_ref, y_ref), grads_ref = run(reference, (x, r, w, 1e-5))
    assert_match([s, y, *grads[:2]], [s_ref, y_ref, *grads_ref[:2]], F32, 's, y, dx, dr')
    assert_match(grads[2:], grads_ref[2:], F32_SUM, 'dw')


def _rope_inputs(layout, B, T, nh, nkv, hd, device):
    """q, k and cos, sin in the three layouts model.py uses."""
    cos, sin = model.rope_table(hd, 50, 10000.0, device=device)
    pos = torch.randint(0, 50, (B, T), device=device)
    if layout == 'packed':  # (N, h, hd) with each token's own angles, (N, 1, hd/2)
        q, k = torch.randn(B * T, nh, hd, device=device), torch.randn(B * T, nkv, hd, device=device)
        return q, k, cos[pos.view(-1)][:, None], sin[pos.view(-1)][:, None]
    # (B, h, T, hd) as transposes of the projections' (B, T, h, hd): not contiguous
    q = torch.randn(B, T, nh, hd, device=device).transpose(1, 2)
    k = torch.randn(B, T, nkv, hd, device=device).transpose(1, 2)
    if layout == 'shared':  # training: one (T, hd/2) table for the batch
        return q, k, cos[:T], sin[:T]
    return q, k, cos[pos][:, None], sin[pos][:, None]  # KV cache: (B, 1, T, hd/2) per lane


def _rope_reference(q, k, cos, sin):
    return model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin)


# nkv 1: grouped-query attention; hd 12 and 10: halves of 6 and 5 pad their blocks
@pytest.mark.parametrize('layout', ['shared', 'lanes', 'packed'])
@pytest.mark.parametrize('B, T, nh, nkv, hd', [(2, 5, 2, 2, 8), (3, 7, 3, 1, 12), (1, 9, 4, 2, 10)])
def test_rope(device, layout, B, T, nh, nkv, hd):
    q, k, cos, sin = _rope_inputs(layout, B, T, nh, nkv, hd, device)
    q.requires_grad_(), k.requires_grad_()
    outs, grads = run(kernels.rope, (q, k, cos, sin), poison=True)
    outs_ref, grads_ref = run(_rope_reference, (q, k, cos, sin))
    assert_match([*outs, *grads], [*outs_ref, *grads_ref], F32, 'q, k, dq, dk')


# block cap 16 splits every row over several programs, the last one part-filled
@pytest.mark.parametrize('shape', [(3, 7, 50), (5, 123), (2, 1000)])
@pytest.mark.parametrize('block_cap', [4096, 16])
def test_swiglu(device, shape, block_cap, monkeypatch):
    monkeypatch.setattr(kernels, 'ELEMENTWISE_BLOCK_CAP', block_cap)
    a, b = (torch.randn(shape, device=device, requires_grad=True) for _ in 'ab')
    outs, grads = run(kernels.swiglu, (a, b), poison=True)
    outs_ref, grads_ref = run(model.swiglu, (a, b))
    assert_match([*outs, *grads], [*outs_ref, *grads_ref], F32, 'c, da, db')


def _ce_inputs(shape, V, masked, device):
    h = torch.randn(*shape, device=device, requires_grad=True)
    w = (torch.randn(V, shape[-1], device=device) / shape[-1] ** 0.5).requires_grad_()  # logits O(1)
    targets = torch.randint(0, V, shape[:-1], device=device)
    mask = torch.rand(shape[:-1], device=device) < 0.6 if masked else None
    if masked:
        targets[~mask] = -1  # never read: an out-of-range target must not matter
    return h, w, targets, mask


def _ce_reference(h, w, targets, mask):
    return model.linear_cross_entropy(h, w, targets, mask)


# vocab 300 with a block cap of 64 loops over 5 blocks; chunks of 7 tokens end part-filled;
# (N, C) is the packed layout model.py passes
@pytest.mark.parametrize('shape, V', [((3, 13, 24), 37), ((2, 5, 16), 300), ((11, 8), 300)])
@pytest.mark.parametrize('chunk_size, block_cap', [(None, 32768), (7, 64)])
@pytest.mark.parametrize('masked', [True, False])
def test_linear_cross_entropy(device, shape, V, chunk_size, block_cap, masked, monkeypatch):
    monkeypatch.setattr(kernels, 'CE_BLOCK_CAP', block_cap)
    h, w, targets, mask = _ce_inputs(shape, V, masked, device)

    def fused(h, w, targets, mask):
        return kernels.linear_cross_entropy(h, w, targets, mask, chunk_size=chunk_size)
    (loss,), (dh, dw) = run(fused, (h, w, targets, mask), poison=True)
    (loss_ref,), (dh_ref, dw_ref) = run(_ce_reference, (h, w, targets, mask))
    assert_match([loss, dh], [loss_ref, dh_ref], F32, 'loss, dh')
    assert_match([dw], [dw_ref], F32_SUM, 'dw')


def test_linear_cross_entropy_edge_cases(device):
    h, w, targets, mask = _ce_inputs((2, 5, 16), 37, True, device)
    # nothing kept: loss 0 and zero gradients (the reference's mean over nothing is nan)
    (loss,), (dh, dw) = run(kernels.linear_cross_entropy, (h, w, targets, torch.zeros_like(mask)))
    assert loss.item() == 0 and not dh.any() and not dw.any()
    # without grad (evaluation) the gradient matmuls are skipped; the loss is the same
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(h, w, targets, mask)
    torch.testing.assert_close(loss, _ce_reference(h, w, targets, mask), **F32)


# ----------------------------------------------------------------------------------------------
# The whole model: kernels='triton' against kernels='torch' with the same weights

def assert_grads_match(fused, ref, tol):
    """Every parameter's gradient within tol of its scale (max |grad|): gradients here range
    from 1e-4 (q_proj) to 0.3 (embed), so one absolute tolerance would not fit them all."""
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        err = ((p.grad - p_ref.grad).abs().max() / p_ref.grad.abs().max()).item()
        assert err < tol, f"{name}: off by {err:.3g} of its gradient's scale"


def _twin_models(device, **overrides):
    args = dict(vocab_size=37, n_embd=24, n_layer=2, n_head=2, block_size=16, **overrides)
    ref = model.GPT(model.GPTConfig(kernels='torch', **args)).to(device)
    fused = model.GPT(model.GPTConfig(kernels='triton', **args)).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


# doc_ids: rows of packed dialogs, -1 for padding (model.py's packed (N, C) path); None: plain
# causal (B, T, C) rows. n_kv_head 1: grouped-query attention.
@pytest.mark.parametrize('packed', [True, False])
@pytest.mark.parametrize('n_kv_head', [2, 1])
def test_gpt_triton_matches_torch(device, packed, n_kv_head):
    ref, fused = _twin_models(device, n_kv_head=n_kv_head)
    idx, targets = (torch.randint(0, 37, (3, 13), device=device) for _ in 'it')
    loss_mask = torch.rand(3, 13, device=device) < 0.7
    doc_ids = torch.tensor([[0] * 5 + [1] * 6 + [-1] * 2, [0] * 13,
                            [0] * 3 + [1] * 3 + [2] * 4 + [-1] * 3], device=device) if packed else None
    losses = []
    for m in (ref, fused):
        if packed:  # training's path, with the fused cross-entropy
            loss = m.packed_loss(idx, targets, loss_mask, doc_ids)
        else:
            _, loss = m(idx, targets, loss_mask=loss_mask)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], **F32)
    # float32 through 2 layers, summed in other orders: seen ~2e-7 of each gradient's scale
    assert_grads_match(fused, ref, 1e-5)


def test_gpt_autocast_bf16_triton_matches_torch(device):
    """As train.py runs: bf16 autocast, so float32 residual stream plus bf16 branch outputs go
    into add_rms_norm, and the cross-entropy's matmuls run in bf16."""
    ref, fused = _twin_models(device)
    idx, targets = (torch.randint(0, 37, (3, 13), device=device) for _ in 'it')
    loss_mask = torch.rand(3, 13, device=device) < 0.7
    losses = []
    for m in (ref, fused):
        with torch.autocast(device, dtype=torch.bfloat16):
            _, loss = m(idx, targets, loss_mask=loss_mask)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], **BF16)
    # a few bf16 roundings (2^-8 each) on the way, in other orders: seen under 2% of each
    # gradient's scale; a wrong cast or a lost gradient is off by far more
    assert_grads_match(fused, ref, 4e-2)


def test_gpt_decode_triton_matches_torch(device):
    """KV-cache inference: lanes at different positions, (B, 1, S, hd/2) rope tables."""
    ref, fused = _twin_models(device)
    idx = torch.randint(0, 37, (2, 4), device=device)
    logits = []
    for m in (ref, fused):
        m.setup_cache(2, max_len=12)
        logits.append(m.prefill(idx, torch.tensor([4, 2], device=device)))
        logits.append(m.decode(idx[:, :1]))  # one step
    torch.testing.assert_close(logits[2], logits[0], **F32)
    torch.testing.assert_close(logits[3], logits[1], **F32)


# ----------------------------------------------------------------------------------------------
# Processes of their own

def _python(args, **env):
    env = {**{k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}, **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_model_imports_without_triton():
    """A machine without Triton: model.py imports, triton_kernels is None, kernels='triton'
    warns and runs the PyTorch path."""
    done = _python(['-c', (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import torch, model\n"
        "assert model.triton_kernels is None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    m = model.GPT(model.GPTConfig(vocab_size=37, n_embd=24, kernels='triton'))\n"
        "_, loss = m(torch.randint(0, 37, (2, 9)), torch.randint(0, 37, (2, 9)))\n"
        "assert torch.isfinite(loss) and any('Triton is unavailable' in str(w.message) for w in caught)\n")])
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason='the tests run in this process')
def test_in_a_fresh_interpreter_process():
    done = _python(['-m', 'pytest', '-q', '-p', 'no:cacheprovider', os.path.abspath(__file__)],
                   TRITON_INTERPRET='1')
    assert done.returncode == 0, done.stdout[-5000:]


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels, bfloat16 at GPT-2 small sizes, against the reference run the same way


def test_gpu_rms_norm_swiglu_rope_bf16(cuda):
    x = torch.randn(8, 1024, 768, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(768, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    (y,), (dx, dw) = run(kernels.rms_norm, (x, w, 1e-5))
    (y_ref,), (dx_ref, dw_ref) = run(model.rms_norm, (x, w, 1e-5))
    assert_match([y, dx], [y_ref, dx_ref], BF16, 'rms_norm y, dx')
    assert_match([dw], [dw_ref], BF16_SUM, 'rms_norm dw')
    a, b = (torch.randn(8192, 3072, device=cuda, dtype=torch.bfloat16, requires_grad=True) for _ in 'ab')
    outs, grads = run(kernels.swiglu, (a, b))
    outs_ref, grads_ref = run(model.swiglu, (a, b))
    assert_match([*outs, *grads], [*outs_ref, *grads_ref], BF16, 'swiglu c, da, db')
    q, k, cos, sin = _rope_inputs('shared', 8, 1024, 12, 12, 64, cuda)
    q, k = (t.bfloat16().requires_grad_() for t in (q, k))
    outs, grads = run(kernels.rope, (q, k, cos, sin))
    outs_ref, grads_ref = run(_rope_reference, (q, k, cos, sin))
    assert_match([*outs, *grads], [*outs_ref, *grads_ref], BF16, 'rope q, k, dq, dk')


def test_gpu_linear_cross_entropy_bf16(cuda):
    h, w, targets, mask = _ce_inputs((8, 1024, 768), 50304, True, cuda)
    h, w = (t.detach().bfloat16().requires_grad_() for t in (h, w))
    (loss,), grads = run(kernels.linear_cross_entropy, (h, w, targets, mask))
    (loss_ref,), grads_ref = run(_ce_reference, (h, w, targets, mask))
    assert_match([loss, grads[0]], [loss_ref, grads_ref[0]], BF16, 'loss, dh')
    assert_match(grads[1:], grads_ref[1:], BF16_SUM, 'dw')
