"""
Benchmark triton_kernels.py against PyTorch: eager (model.py's reference), torch.compile of the same
reference, and the Triton kernel, forward and forward+backward, at the paper's tiny model
(B*T = 128*256, n_embd 64, vocab 260) and at GPT-2 small (B*T = 8*1024, n_embd 768, vocab 50304).

    python bench/kernels.py                         # both shapes, bf16, table + bench/kernels.json
    python bench/kernels.py --shapes=tiny --bandwidth=3350 --out=/tmp/k.json

Times are medians of triton.testing.do_bench. GB/s counts the bytes an op must move at least
(each input read once, each output written once) over the median time, compared with the
device's memory bandwidth (looked up by name, or --bandwidth in GB/s). The cross-entropy is
matmul-bound, so it reports TFLOP/s as well. Peak memory is what one call adds on top of its
inputs. Needs CUDA: on a machine without it, says so and exits 0.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import configurator  # noqa: E402

DEFAULTS = dict(
    shapes='both',           # 'tiny' | 'gpt2' | 'both'
    ops='rms_norm,add_rms_norm,rope,swiglu,linear_cross_entropy',  # the ops to time
    dtype='bfloat16',        # of the activations and weights
    bandwidth=0.0,           # device memory bandwidth in GB/s; 0: look it up by device name
    compile=True,            # also time torch.compile of the reference
    out=os.path.join('bench', 'kernels.json'),  # the table is also written here
)
# (name fragment, GB/s): first match wins, so the more specific names come first
BANDWIDTH_GBPS = [('H200', 4800), ('H100 PCIe', 2000), ('H100', 3350), ('A100-SXM4-80GB', 2039),
                  ('A100 80GB', 1935), ('A100', 1555), ('L40S', 864), ('L4', 300), ('A10G', 600)]
SHAPES = {  # B, T, n_embd, n_head, vocab
    'tiny': dict(B=128, T=256, C=64, nh=2, V=260),
    'gpt2': dict(B=8, T=1024, C=768, nh=12, V=50304),
}


def make_cases(s, dtype, dev):
    """-> {op: (reference fn, triton fn, inputs, bytes(mode), flops(mode))} for one shape set."""
    import model
    import triton_kernels as kernels
    B, T, C, nh, V = s['B'], s['T'], s['C'], s['nh'], s['V']
    N, hd, e = B * T, C // nh, torch.finfo(dtype).bits // 8

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_()
    cos, sin = model.rope_table(hd, T, 10000.0, device=dev)
    mask = torch.rand(B, T, device=dev) < 0.5
    return {
        'rms_norm': (model.rms_norm, kernels.rms_norm, (rand(B, T, C), rand(C), 1e-5),
                     lambda m: N * C * e * (2 if m == 'fwd' else 5), lambda m: 0),
        'add_rms_norm': (model.add_rms_norm, kernels.add_rms_norm, (rand(B, T, C), rand(B, T, C), rand(C), 1e-5),
                         lambda m: N * C * e * (4 if m == 'fwd' else 8), lambda m: 0),
        'rope': (model.rope,
                 kernels.rope, (rand(B, nh, T, hd), rand(B, nh, T, hd), cos, sin),
                 lambda m: 2 * N * C * e * (2 if m == 'fwd' else 4), lambda m: 0),
        'swiglu': (model.swiglu, kernels.swiglu, (rand(B, T, 4 * C), rand(B, T, 4 * C)),
                   lambda m: N * 4 * C * e * (3 if m == 'fwd' else 8), lambda m: 0),
        'linear_cross_entropy': (
            model.linear_cross_entropy,
            kernels.linear_cross_entropy,
            (rand(B, T, C), rand(V, C, scale=C ** -0.5), torch.randint(0, V, (B, T), device=dev), mask),
            # read h, W (and write their grads when training); 2 N C V flops per matmul
            lambda m: (N * C + V * C) * e * (1 if m == 'fwd' else 2),
            lambda m: 2 * N * C * V * (1 if m == 'fwd' else 3)),
    }


def timed(fn, inputs, mode):
    """-> (median ms, peak MiB above the inputs) of a forward, or forward + backward."""
    import triton.testing
    leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]

    def step():
        out = fn(*inputs)
        if mode == 'fwd+bwd':
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    for _ in range(3):  # compile (torch.compile, Triton) and warm up before do_bench's estimate
        step()
    torch.cuda.synchronize()
    for t in leaves:
        t.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    ms = triton.testing.do_bench(step, grad_to_none=leaves, return_mode='median')
    for t in leaves:
        t.grad = None
    return ms, peak_mib


def device_bandwidth(cfg):
    if cfg.bandwidth:
        return cfg.bandwidth
    name = torch.cuda.get_device_name()
    for fragment, gbps in BANDWIDTH_GBPS:
        if fragment in name:
            return gbps
    print(f"unknown bandwidth for {name}: pass --bandwidth=GB/s for the % column")
    return None


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks={'shapes': ('tiny', 'gpt2', 'both'),
                                                          'dtype': ('float32', 'bfloat16')})
    if not torch.cuda.is_available():
        print("bench/kernels.py needs CUDA: the Triton kernels compile for the GPU. Nothing to do.")
        return 0
    import model
    if model.triton_kernels is None:
        print("bench/kernels.py needs Triton, which does not import here. Nothing to do.")
        return 0
    dev, dtype = torch.device('cuda'), getattr(torch, cfg.dtype)
    bandwidth = device_bandwidth(cfg)
    shape_names = list(SHAPES) if cfg.shapes == 'both' else [cfg.shapes]
    unknown = [n for n in shape_names if n not in SHAPES] + \
        [op for op in cfg.ops.split(',') if op not in DEFAULTS['ops'].split(',')]
    if unknown:
        raise SystemExit(f"error: unknown shapes or ops {unknown}; see DEFAULTS in bench/kernels.py")
    rows = []
    header = (f"{'op':<22}{'shapes':<7}{'mode':<9}{'impl':<9}{'ms':>9}{'GB/s':>9}{'%bw':>6}"
              f"{'TFLOP/s':>9}{'peak MiB':>10}")
    print(f"{torch.cuda.get_device_name()}, {cfg.dtype}, bandwidth {bandwidth} GB/s\n{header}")
    for shape_name in shape_names:
        cases = make_cases(SHAPES[shape_name], dtype, dev)
        for op in cfg.ops.split(','):
            reference, fused, inputs, nbytes, nflops = cases[op]
            impls = {'eager': reference, 'compile': torch.compile(reference) if cfg.compile else None,
                     'triton': fused}
            for mode in ('fwd', 'fwd+bwd'):
                for impl, fn in impls.items():
                    if fn is None:
                        continue
                    try:
                        ms, peak = timed(fn, inputs, mode)
                    except Exception as e:  # noqa: BLE001 - one failing config must not end the run
                        print(f"{op:<22}{shape_name:<7}{mode:<9}{impl:<9} failed: {type(e).__name__}: {e}")
                        rows.append(dict(op=op, shapes=shape_name, mode=mode, impl=impl, error=repr(e)))
                        continue
                    gbps = nbytes(mode) / ms / 1e6
                    tflops = nflops(mode) / ms / 1e9
                    rows.append(dict(op=op, shapes=shape_name, mode=mode, impl=impl, ms=ms,
                                     gbps=gbps, pct_bandwidth=100 * gbps / bandwidth if bandwidth else None,
                                     tflops=tflops or None, peak_mib=peak))
                    pct = f"{100 * gbps / bandwidth:6.1f}" if bandwidth else f"{'-':>6}"
                    tf = f"{tflops:9.1f}" if tflops else f"{'-':>9}"
                    print(f"{op:<22}{shape_name:<7}{mode:<9}{impl:<9}{ms:9.4f}{gbps:9.1f}{pct}{tf}{peak:10.1f}")
    result = dict(device=torch.cuda.get_device_name(), bandwidth_gbps=bandwidth, dtype=cfg.dtype,
                  torch=torch.__version__, shapes={k: SHAPES[k] for k in shape_names}, results=rows)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(json.dumps(dict(out=cfg.out, device=result['device'], n_results=len(rows))))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
