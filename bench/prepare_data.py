"""
Data preparation speed: people/s and tokens/s for every dataset, with the byte tokenizer.

    python bench/prepare_data.py                      # 1,000,000 people
    python bench/prepare_data.py --n_people=100000 --bpe_vocab=512
"""
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configurator  # noqa: E402
import prepare_data  # noqa: E402

DEFAULTS = {**prepare_data.DEFAULTS, 'n_people': 1_000_000, 'out_dir': ''}


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks=prepare_data.CHECKS)
    keep = bool(cfg.out_dir)  # a named out_dir is kept; the default temporary one is removed
    out_dir = cfg.out_dir or tempfile.mkdtemp(prefix='nano-itl-bench-')
    cfg.out_dir, cfg.overwrite = out_dir, True
    try:
        t0 = time.time()
        meta = prepare_data.prepare(cfg)
        elapsed = time.time() - t0
        tokens = sum(s['tokens'] for s in meta['shards'].values())
        people = cfg.n_people + cfg.n_ood
        disk = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    finally:
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps({'people': people, 'tokens': tokens, 'seconds': round(elapsed, 2),
                      'people_per_s': round(people / elapsed), 'tokens_per_s': round(tokens / elapsed),
                      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
                      'disk_gb': round(disk / 1e9, 2), 'tokenizer': meta['tokenizer']['kind'],
                      'cpus': os.cpu_count()}))


if __name__ == '__main__':
    main(sys.argv[1:])
