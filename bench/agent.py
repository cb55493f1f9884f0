"""
Generation throughput of a trained in-tool model through agent.py: prompts/s and generated
tokens/s at several batch sizes, tool calls included, one token a step and with drafts (the
same answers, checked here), against two floors measured in the same run:

    matmul   the model's own matrix products alone, for every token the agent ran through it
    bare     one-token-a-step decoding of the same questions: prefill, then forward passes over a
             static KV cache, as many steps as the dialogs' mean length, no tool, no bookkeeping

Each time is the fastest of --repeats timings (the machine drifts from one to the next).

    python bench/agent.py --out_dir=out/quick                 # batch 1, 64, 1024 on this machine
    python bench/agent.py --out_dir=out/quick --dtype=bfloat16 --batch_sizes=[1024]
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import configurator  # noqa: E402
from model import CheckpointError, autocast, keep_freed_memory, resolve_device, resolve_dtype  # noqa: E402

DEFAULTS = dict(
    out_dir='out/quick',                 # the trained in-tool model (bash quickstart.sh trains it)
    split='ood',                         # questions about 'train' or 'ood' people
    batch_sizes=[1, 64, 1024],           # lanes generated together, one timing each
    questions_per_size=[16, 256, 1024],  # questions timed at each batch size
    draft=8,                             # agent.py's drafts, timed against draft=0
    repeats=3,                           # timings of each: the fastest is kept, the agent's and the floors'
    device='auto',                       # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',                        # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16'
    threads=0,                           # CPU threads; 0: torch's default (every core)
)


def timed(fn, device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def counting_tokens(model):
    """Wrap model.decode to count the tokens it is fed (prompts, tool answers, drafts) and the
    context they attend over -> a dict the counts land in."""
    seen = {'tokens': 0, 'context': 0}
    decode = model.decode

    def counted(idx, n_new=None, rows=None, every=False):
        lengths = model.cache_lengths if rows is None else model.cache_lengths[rows]
        n = torch.full((idx.size(0),), idx.size(1)) if n_new is None else n_new.cpu()
        seen['tokens'] += int(n.sum())
        seen['context'] += int((n * (lengths.cpu() + (n + 1) / 2)).sum())  # keys each new token sees
        return decode(idx, n_new, rows, every)
    model.decode = counted
    return seen


def forward_flops(model, tokens, context):
    """FLOPs of running `tokens` tokens through the model attending over `context` keys in all:
    2 per weight of every matrix product (the head included), 4 per key and width per layer."""
    c = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * matmul_params * tokens + 4 * c.n_layer * c.n_embd * context


def matmul_seconds(model, tokens, rows, device, dtype, repeats):
    """The model's Linear layers alone on (rows, width) inputs, as many times as `tokens` tokens
    need: the arithmetic floor at these shapes -> (seconds, FLOP/s). The fastest of `repeats`
    timings: on 2 CPU cores one timing of these small products ranged over 37-81 GFLOP/s.
    Into outputs allocated once: allocating them each call measured ~72 GFLOP/s in about half
    the processes and ~140 in the others (2 AMD EPYC cores, the same code); these run at ~150."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features, device=device, dtype=dtype) for m in layers]
    weights = [m.weight.detach().to(dtype).t() for m in layers]
    outputs = [torch.empty(rows, m.out_features, device=device, dtype=dtype) for m in layers]
    run = lambda: [torch.mm(x, w, out=y) for x, w, y in zip(inputs, weights, outputs)]
    run()
    passes = max(3, min(200, tokens // rows))
    seconds = min(timed(lambda: [run() for _ in range(passes)], device)[1] for _ in range(repeats))
    flops = 2 * sum(w.numel() for w in weights) * rows * passes
    return seconds / passes / rows * tokens, flops / seconds


@torch.no_grad()
def bare_seconds(model, prompts, steps, device):
    """Prefill the prompts (token ids), then `steps` one-token forward passes of every lane over a
    static cache, greedy, nothing else."""
    length = torch.tensor([len(p) for p in prompts], device=device)
    idx = torch.zeros(len(prompts), int(length.max()), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)

    def run():
        model.setup_cache(len(prompts), int(length.max()) + steps + 1)
        logits = model.prefill(idx, length)
        for _ in range(steps):
            logits = model.decode(logits.argmax(-1)[:, None])
    return timed(run, device)[1]


def main(argv):
    checks = {k: agent.CHECKS[k] for k in ('split', 'device', 'dtype')}
    cfg = configurator.main_parse(DEFAULTS, argv, checks=checks)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device == 'cpu':
        keep_freed_memory()  # as agent.py does
    try:
        model, ckpt, data_dir = agent.load_trained(cfg.out_dir, device)
    except (FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e} (bash quickstart.sh trains out/quick)")
    make = lambda draft: agent.make_agent(model, ckpt['tokenizer'], os.path.join(data_dir, 'people.db'),
                                          ckpt['config']['dataset'], dtype, data_dir, draft)
    bots = {'one_token': make(0), 'drafted': make(cfg.draft)}
    seen = counting_tokens(model)
    for batch_size, n in zip(cfg.batch_sizes, cfg.questions_per_size):
        questions = agent.read_questions(data_dir, cfg.split, n)
        row = {'batch_size': batch_size, 'device': device, 'dtype': dtype, 'threads': torch.get_num_threads(),
               'num_params': model.num_params(), 'questions': len(questions)}
        texts = {}
        with autocast(device, dtype):
            for name, bot in bots.items():
                agent.evaluate(bot, questions[:batch_size], batch_size)  # warm-up
                runs = []
                for _ in range(cfg.repeats):
                    seen.update(tokens=0, context=0)
                    runs.append(agent.evaluate(bot, questions, batch_size))
                metrics, lanes = max(runs, key=lambda run: run[0]['prompts_per_s'])
                texts[name] = [lane.text for lane in lanes]
                seconds = len(questions) / metrics['prompts_per_s']
                flops = forward_flops(model, seen['tokens'], seen['context'])
                row[name] = {**metrics, 'seconds': round(seconds, 3), 'tokens_run': seen['tokens'],
                             'gflop_per_question': round(flops / len(questions) / 1e9, 6),
                             'gflop_per_s': round(flops / seconds / 1e9, 2)}
            floor_tokens = row['one_token']['tokens_run']
            matmul_s, matmul_rate = matmul_seconds(model, floor_tokens, min(batch_size, len(questions)),
                                                   device, getattr(torch, dtype), cfg.repeats)
            prompts = bots['drafted'].encode_prompts([q['question'] for q in questions])
            steps = round((floor_tokens - sum(map(len, prompts))) / len(questions))
            bare_s = min(sum(bare_seconds(model, prompts[i:i + batch_size], steps, device)
                             for i in range(0, len(prompts), batch_size)) for _ in range(cfg.repeats))
        drafted = row['drafted']['seconds']
        row.update(same_answers=texts['drafted'] == texts['one_token'],
                   speedup_of_drafts=round(row['one_token']['seconds'] / drafted, 2),
                   matmul_gflop_per_s=round(matmul_rate / 1e9, 1),
                   share_of_matmul_rate=round(row['drafted']['gflop_per_s'] * 1e9 / matmul_rate, 3),
                   matmul_floor_s=round(matmul_s, 3), bare_decode_s=round(bare_s, 3), bare_decode_steps=steps,
                   drafted_over_matmul_floor=round(drafted / matmul_s, 2),
                   drafted_over_bare_decode=round(drafted / bare_s, 2))
        print(json.dumps(row), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
