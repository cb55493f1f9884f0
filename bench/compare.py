"""
Time two versions of model.py against each other in one process. Training steps alternate between
them on the same batches, so a machine whose speed drifts (a shared or throttled CPU) slows both
alike, where two separate runs can differ by 20% for no reason in the code.

    git show HEAD~1:model.py > /tmp/model_before.py
    python bench/compare.py config/memory.py --baseline=/tmp/model_before.py --device=cpu --dtype=bfloat16
    python bench/compare.py config/memory.py --baseline=/tmp/model_before.py --device=cpu --dtype=bfloat16 --compile=True

Prints one JSON line per version: median and 25th-percentile step ms, and the last loss (equal
losses: the two versions compute the same thing).
"""
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configurator  # noqa: E402
import train  # noqa: E402

DEFAULTS = {**train.DEFAULTS,
            'baseline': '',   # the other model.py
            'max_iters': 30,  # timed steps of each version
            'warmup': 3}      # untimed steps of each first


def load_module(path, name):
    """path's module, registered as `name`: torch.compile looks modules up by name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(module, cfg, meta, device):
    """The version's GPT and optimizer, initialised from the same seed."""
    fields = module.GPTConfig.__dataclass_fields__
    args = {k: getattr(cfg, k) for k in train.MODEL_KEYS + ('kernels',) if k in fields}
    torch.manual_seed(cfg.seed)
    model = module.GPT(module.GPTConfig(vocab_size=meta['vocab_size'], block_size=cfg.block_size, **args))
    model = model.to(device)
    return model, model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                            device.split(':')[0])


def training_forward(model, cfg, device):
    """A version's training call -> loss: packed_loss where it has one (train.py's), else the
    loss of forward(idx, targets, loss_mask, doc_ids), as model.py had before packed_loss."""
    if hasattr(model, 'packed_loss'):
        return train.training_forward(model, cfg, device)
    forward = train.compiled(model, device) if train.compiles(cfg, device, from_scratch=True) else model
    return lambda *batch: forward(*batch)[1]


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks=train.CHECKS)
    if not os.path.isfile(cfg.baseline):
        sys.exit(f"--baseline={cfg.baseline!r} is not a file: pass the model.py to compare with, "
                 f"e.g. git show HEAD~1:model.py > /tmp/model_before.py")
    device, dtype, _, _ = train.setup_device(cfg)
    meta = train.load_dataset_meta(cfg.data_dir)
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'model.py')
    versions = {'baseline': build(load_module(cfg.baseline, 'model_baseline'), cfg, meta, device),
                'model.py': build(load_module(here, 'model_here'), cfg, meta, device)}
    # one batch stream each, from the same seed: both versions train on the same batches
    batches = {name: train.PackedBatches(cfg.data_dir, train.parse_mixture(cfg.dataset), 'train',
                                         cfg.block_size, cfg.seed, meta['vocab_size'])
               for name in versions}

    forwards = {name: training_forward(model, cfg, device) for name, (model, _) in versions.items()}

    def step(name):  # train.py's own step; its loss.item() waits for the GPU too
        model, optimizer = versions[name]
        t0 = time.perf_counter()
        loss, _, _ = train.accumulate_gradients(forwards[name], batches[name], cfg, device, dtype)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss

    times, losses = {name: [] for name in versions}, {}
    for i in range(cfg.warmup + cfg.max_iters):
        order = list(versions) if i % 2 else list(versions)[::-1]  # neither always goes first
        for name in order:
            dt, losses[name] = step(name)
            if i >= cfg.warmup:
                times[name].append(dt)
    for name, ts in times.items():
        ts = sorted(ts)
        print(json.dumps({'version': name, 'path': cfg.baseline if name == 'baseline' else here,
                          'dataset': cfg.dataset, 'dtype': dtype, 'device': device,
                          'step_ms': round(statistics.median(ts) * 1000, 2),
                          'step_ms_p25': round(ts[len(ts) // 4] * 1000, 2),
                          'last_loss': round(losses[name], 5)}), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
