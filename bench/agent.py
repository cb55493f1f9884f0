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
from model import pick_device  # noqa: E402

DEFAULTS = dict(
    out_dir='out/quick',
    split='ood',
    batch_sizes=[1, 64, 1024],
    questions_per_size=[16, 256, 1024],  # questions timed at each batch size
    device='auto',
    dtype='float32',
    threads=0,
)


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        model, ckpt = agent.load_checkpoint(cfg.out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e} (bash quickstart.sh trains out/quick)")
    data_dir = ckpt['config']['data_dir']
    bot = agent.make_agent(model, ckpt['tokenizer']['tokenizer'], os.path.join(data_dir, 'people.db'),
                           ckpt['config']['dataset'], cfg.dtype)
    autocast = torch.autocast(device.split(':')[0], dtype=torch.bfloat16, enabled=cfg.dtype == 'bfloat16')
    for batch_size, n in zip(cfg.batch_sizes, cfg.questions_per_size):
        questions = agent.read_questions(data_dir, cfg.split, n)
        with autocast:
            agent.evaluate(bot, questions[:batch_size], batch_size)  # warm-up
            metrics, _ = agent.evaluate(bot, questions, batch_size)
        print(json.dumps({'batch_size': batch_size, 'device': device, 'dtype': cfg.dtype,
                          'threads': torch.get_num_threads(), 'num_params': model.num_params(),
                          **metrics}), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
