"""
Generation throughput of a trained in-tool model through agent.py: prompts/s and generated
tokens/s at several batch sizes, tool calls included.

    python bench/agent.py --out_dir=out/quick                 # batch 1, 64, 1024 on this machine
    python bench/agent.py --out_dir=out/quick --dtype=bfloat16 --batch_sizes=[1024]
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import configurator  # noqa: E402
from model import CheckpointError, autocast, resolve_device, resolve_dtype  # noqa: E402

DEFAULTS = dict(
    out_dir='out/quick',                 # the trained in-tool model (bash quickstart.sh trains it)
    split='ood',                         # questions about 'train' or 'ood' people
    batch_sizes=[1, 64, 1024],           # lanes generated together, one timing each
    questions_per_size=[16, 256, 1024],  # questions timed at each batch size
    device='auto',                       # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',                        # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16'
    threads=0,                           # CPU threads; 0: torch's default (every core)
)


def main(argv):
    checks = {k: agent.CHECKS[k] for k in ('split', 'device', 'dtype')}
    cfg = configurator.main_parse(DEFAULTS, argv, checks=checks)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        model, ckpt, data_dir = agent.load_trained(cfg.out_dir, device)
    except (FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e} (bash quickstart.sh trains out/quick)")
    bot = agent.make_agent(model, ckpt['tokenizer'], os.path.join(data_dir, 'people.db'),
                           ckpt['config']['dataset'], dtype)
    for batch_size, n in zip(cfg.batch_sizes, cfg.questions_per_size):
        questions = agent.read_questions(data_dir, cfg.split, n)
        with autocast(device, dtype):
            agent.evaluate(bot, questions[:batch_size], batch_size)  # warm-up
            metrics, _ = agent.evaluate(bot, questions, batch_size)
        print(json.dumps({'batch_size': batch_size, 'device': device, 'dtype': dtype,
                          'threads': torch.get_num_threads(), 'num_params': model.num_params(),
                          **metrics}), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
