"""
C loops for generating on CPU (their source: cpu_kernels.c), built once a machine (~1 s, then kept
in ~/.cache/nano-itl) with the compiler torch.compile uses and called through ctypes on torch's
thread count. Where they do not build (no compiler) or the CPU lacks AVX-512 (all but matvec),
model.py runs its PyTorch math.

    matvec   one row times a weight kept as low-bit blocks (lowbit.py): a byte a value
    attend   attention of a decode step over the KV cache, for heads of 32 (the paper's models)
             or 64 (SmolLM2), from the projections on: rotation, cache writes, attention. model.py's setup_cache
             then stores the keys in tiles of 16 positions (key_tiles_shape)
    rms_norm, add_rms_norm, swiglu   the rest of such a step (model.py's functions of those names)
    argmax   each row's largest logit, as torch.argmax (agent.py's greedy steps)
    linear_rows   a Linear layer without autograd over a weight of >= 64k values (a pretrained model's
             prefill and decode steps)
    decode_blocks   a decode step's every block, for models whose weights fit in a core's caches
             (the paper's): a thread takes a group of lanes through all layers, attend's loop included

decode_blocks: agent.py at 1024 lanes on 2 AMD EPYC cores, out/quick's model: ~650-700 ms a batch
against ~820-990 with the same loops called block by block from Python (products through MKL,
1,673 calls a batch). Its products read the weights transposed, 6 rows x 64 columns of sums in
registers: ~200 GFLOP/s on rows in the caches, where MKL ran these shapes at 101-153. Attention
reads each lane's cache from memory (~105 MB a step at 1024 lanes): the products before it
fetch the group's keys and values into L2 as they go (the MLP's, the next layer's or the thread's
next group's; a first group's q k v, its first layer's), ~8% off a batch.

linear_rows: at 32 rows of SmolLM2 (weights of 0.3-113 MB from memory) ~190 GFLOP/s, MKL ~97;
at 625 rows (a prefill) ~205 against ~175. Both loops keep the row of x they multiply in a
register by hand: gcc otherwise reloaded it for every product, 28 loads a step for 24
multiply-adds, and the loop ran at ~60% of the multiply-add rate instead of ~90%.

attend: at 1024 lanes, 2 heads, ~140 cached tokens, 2 AMD EPYC cores, `scaled_dot_product_attention`
takes 8-9 ms a layer with one query a lane and 11-13 ms with drafts of up to 8 more, the
rotation and cache writes not counted; this takes 3.3 and 5.4-5.9 ms with them. SDPA spends its
time on small matrix products per lane and head; here a lane's queries share each vector of 16
keys they load, and the keys' layout, tiles of 16 positions, makes a lane's keys one run of
memory. At 1024 lanes a step reads ~57 MB of cache a layer, from memory: 128 lanes, whose cache
stays in the CPU's, take half the time a lane; over 4 KB pages nearly every lane's keys missed
the TLB, and a cache on 2 MB pages (model.py's huge_pages) takes 15-20% less. Its e^x is a degree-6 polynomial
(~1e-7 relative): the outputs agree with SDPA's to ~1e-6.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch


def cxx_compiler():
    """The C++ compiler inductor would use on CPU (torch.compile writes C++ there), or None."""
    return next(filter(None, map(shutil.which, (os.environ.get('CXX', 'g++'), 'g++', 'clang++'))), None)


# The C loops, compiled once a machine (build)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cpu_kernels.c')) as f:
    C_SOURCE = f.read()
_library = None


def library():
    """The C loops, loaded once a process (None where they do not build)."""
    global _library
    if _library is None:
        _library = build() or False
    return _library or None


def build():
    """C_SOURCE as a loaded library for this machine's CPU, with OpenMP threads or, where the
    compiler has no OpenMP, on one -> ctypes.CDLL, or None where it does not build. Built once a
    machine (~1 s) and kept in the user's cache folder, named for the source, compiler and CPU."""
    compiler = cxx_compiler()
    if compiler is None:
        return None
    for threads in (['-fopenmp'], []):
        flags = ['-x', 'c', '-O3', '-march=native', *threads, '-shared', '-fPIC']
        built = cached_name(compiler, flags)
        if os.path.exists(built) or compile_to(built, compiler, flags):
            try:
                library = ctypes.CDLL(built)
            except OSError:  # a noexec folder, a damaged file
                return None
            library.matvec.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_int]
            if library.has_attend():
                library.attend.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_int64] * 5 + [ctypes.c_int]
                norm = [ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
                library.rms_norm.argtypes = [ctypes.c_void_p] * 2 + norm
                library.add_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_void_p] + norm[1:]
                library.swiglu.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
                library.argmax_rows.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
                library.linear_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                library.decode_blocks.argtypes = ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 8
                                                  + [ctypes.c_float, ctypes.c_int])
            return library
    return None


def cached_name(compiler, flags):
    """The built library's file: its name says what it was built from and for (-march=native
    code runs only on the CPU that built it, so the CPU's flags and the machine's name count)."""
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        cpu = platform.processor()
    key = '\0'.join([C_SOURCE, compiler, *flags, cpu, platform.machine(), platform.node()])
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    if not os.access(root if os.path.isdir(root) else os.path.dirname(root), os.W_OK):
        root = tempfile.gettempdir()
    return os.path.join(root, 'nano-itl', f'cpu_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so')


def compile_to(path, compiler, flags):
    """Compile C_SOURCE to path (under a temporary name, then renamed) -> whether it built."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as folder:
            source, built = os.path.join(folder, 'cpu_kernels.c'), os.path.join(folder, 'cpu_kernels.so')
            with open(source, 'w') as f:
                f.write(C_SOURCE)
            if subprocess.run([compiler, *flags, source, '-o', built], capture_output=True, timeout=120).returncode:
                return False
            os.replace(built, path)
        return True
    except (OSError, subprocess.TimeoutExpired):  # no compiler after all, a folder we cannot write
        return False


def matvec(x, codes, scale, offset):
    """x (cols,) float32 @ the weight of codes, scale, offset -> (rows,)."""
    x = x.contiguous()
    y = x.new_empty(codes.size(2))
    library().matvec(codes.data_ptr(), scale.data_ptr(), offset.data_ptr(), x.data_ptr(), y.data_ptr(),
                     codes.size(0), codes.size(2), torch.get_num_threads())
    return y


def serves(device, dtype):
    """Whether the loops below serve tensors of this device and dtype: float32 on a CPU with AVX-512."""
    return (torch.device(device).type == 'cpu' and dtype == torch.float32 and library() is not None
            and bool(library().has_attend()))


def attends(device, dtype, head_dim):
    """Whether attend serves a KV cache of this device, dtype and head size (32: the paper's
    models; 64: SmolLM2's)."""
    return serves(device, dtype) and head_dim in (32, 64)


def key_tiles_shape(rows, kv_heads, max_len, head_dim=32):
    """The key cache's shape as attend stores it: (rows, kv_heads, tiles, head_dim, 16), tiles of
    16 positions: [r, h, p // 16, :, p % 16] is row r's key of head h at position p."""
    return torch.Size((rows, kv_heads, -(-max_len // 16), head_dim, 16))


def attend(q, k, v, cos, sin, k_tiles, v_cache, rows, lengths, n_new):
    """A decode step's attention from its projections: lane b's n_new[b] tokens, in lane order,
    are rows of q (N, heads * hd), k, v (N, kv_heads * hd), at positions lengths[b] .. of cache
    row rows[b]. Rotates q and k by cos, sin (N, hd / 2), writes k and v into k_tiles (of
    key_tiles_shape) and v_cache (rows, kv_heads, max_len, hd) -> (N, heads * hd)."""
    q, k, v, cos, sin = (t.contiguous() for t in (q, k, v, cos, sin))
    out = torch.empty_like(q)
    rows, lengths, n_new = (t.to(torch.int64).contiguous() for t in (rows, lengths, n_new))
    kv_heads, max_len, head_dim = v_cache.shape[1:]
    library().attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                     k_tiles.data_ptr(), v_cache.data_ptr(), rows.data_ptr(), lengths.data_ptr(),
                     n_new.data_ptr(), out.data_ptr(), len(n_new), q.size(1) // head_dim, kv_heads, max_len,
                     head_dim, torch.get_num_threads())
    return out


def decode_blocks(x, cos, sin, weights, k_caches, v_caches, rows, lengths, n_new, heads, eps):
    """A decode step's blocks in one call, for a model whose weights fit in the CPU's caches: x (N, C)
    the new tokens lane by lane (as attend takes them), cos, sin (N, hd / 2); weights: 9 a block
    (attention norm, q k v o as (in, out), MLP norm, gate up down as (in, out)); each block's
    caches as attend keeps them -> x after every block."""
    x, cos, sin = (t.contiguous() for t in (x, cos, sin))
    x = x.clone()
    rows, lengths, n_new = (t.to(torch.int64).contiguous() for t in (rows, lengths, n_new))
    kv_heads, max_len, head_dim = v_caches[0].shape[1:]
    pointers = lambda tensors: (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    library().decode_blocks(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), pointers(weights), pointers(k_caches),
                            pointers(v_caches), rows.data_ptr(), lengths.data_ptr(), n_new.data_ptr(), len(n_new),
                            len(k_caches), x.size(1), heads, kv_heads, head_dim, weights[6].size(1), max_len, eps,
                            torch.get_num_threads())
    return x


# The same math as model.py's PyTorch functions of these names, for float32 on CPU and no autograd:
# model.py's decode runs them in every float32 step on a CPU they serve (one pass over the rows
# instead of several ops).

def rms_norm(x, weight, eps):
    x = x.contiguous()
    out = torch.empty_like(x)
    library().rms_norm(x.data_ptr(), weight.data_ptr(), eps, out.data_ptr(), x.numel() // x.size(-1), x.size(-1),
                       torch.get_num_threads())
    return out


def add_rms_norm(x, residual, weight, eps):
    """-> (x + residual, rms_norm(x + residual))."""
    x, residual = x.contiguous(), residual.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    library().add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), eps, total.data_ptr(),
                           out.data_ptr(), x.numel() // x.size(-1), x.size(-1), torch.get_num_threads())
    return total, out


def swiglu(a, b):
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    library().swiglu(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), torch.get_num_threads())
    return out


def argmax(x):
    """x.argmax(-1): one pass over each row for float32 (N, V) on CPU, where agent.py's drafted
    steps took torch's ~25 ms a batch of 1024 on logits of ~5k x 260; else torch's."""
    if not (x.dim() == 2 and x.size(1) and serves(x.device, x.dtype)):
        return x.argmax(-1)
    x = x.contiguous()
    out = torch.empty(x.size(0), dtype=torch.long)
    library().argmax_rows(x.data_ptr(), out.data_ptr(), x.size(0), x.size(1), torch.get_num_threads())
    return out


def serves_linear(x, linear):
    """Whether linear_rows serves x through this Linear: a pretrained model's weight (>= 64k values),
    float32 on CPU, no grad, rows of x at any count. MKL's sgemm packs the weight anew each call:
    at 32 rows of SmolLM2 (weights of 0.3-113 MB, from memory) it ran at ~97 GFLOP/s against
    ~190 here, and at 100-4096 rows at 110-177 against 180-210. Small weights (the paper's
    models, <256 KB) and training stay with MKL."""
    w = linear.weight
    return (x.dim() == 2 and x.size(1) % 16 == 0 and w.numel() >= 65536
            and x.dtype == w.dtype and w.is_contiguous() and linear.bias is None
            and not torch.is_grad_enabled() and serves(x.device, x.dtype))


def linear_rows(x, weight):
    """x (M, K) @ weight.T for weight (N, K) -> (M, N): see serves_linear."""
    x = x.contiguous()
    y = x.new_empty(x.size(0), weight.size(0))
    library().linear_rows(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.size(0), weight.size(0), x.size(1),
                          torch.get_num_threads())
    return y
