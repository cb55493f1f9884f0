"""Every script's command line: --help, and values refused up front in one line."""
import os
import subprocess
import sys

import pytest
import torch

import agent
import configurator
import prepare_data
import sample
import sweep
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('prepare_data.py', 'train.py', 'agent.py', 'sample.py', 'sweep.py', 'plot.py',
           'bench/prepare_data.py', 'bench/train.py', 'bench/compare.py', 'bench/agent.py',
           'bench/kernels.py', 'bench/generate.py', 'pretrained.py', 'drift.py', 'bench/finetune.py')


def test_every_script_answers_help_with_every_option_and_its_meaning():
    runs = {s: subprocess.Popen([sys.executable, s, '--help'], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for s in SCRIPTS}  # side by side
    for script, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, f'{script}: {err[-2000:]}'
        lines = out.splitlines()
        options = {}  # option -> its meaning: beside it, or on the next line for a long default
        for i, line in enumerate(lines):
            if line.startswith('  --'):
                flag, _, meaning = line.strip().partition(' ')
                following = lines[i + 1] if i + 1 < len(lines) else ''
                options[flag] = meaning.strip() or (following.strip() if not following.startswith('  --') else '')
        assert options and all(options.values()), f'{script}: an option without a meaning\n{out}'
        first_doc_line = out.lstrip().splitlines()[0]
        assert first_doc_line and not first_doc_line.startswith('options'), f'{script}: no docstring'


REFUSED = [  # (script, flags, what the line must say)
    (train, ['--lr_decay=cosin'], "--lr_decay='cosin' is not valid: choose one of 'cosine', 'linear'"),
    (train, ['--dtype=fp16'], "choose one of 'auto', 'float32', 'bfloat16'"),
    (train, ['--stop_metric=recal'], "choose one of '', 'val_loss', 'recall', 'recall_ood', 'recall_min'"),
    (train, ['--dataset=qatol'], "name datasets of bio, qa, qatool, or a mixture such as 'bio:1,qa:3'"),
    (train, ['--dataset=qa:0'], 'name datasets of bio, qa, qatool'),
    (train, ['--init_from=resum'], "use 'scratch', 'resume', or the out_dir of another run"),
    (train, ['--kernels=cuda'], "choose one of 'auto', 'triton', 'torch'"),
    (train, ['--device=gpu'], 'not a device: use auto, cpu, cuda or cuda:N'),
    (train, ['--lerning_rate=1'], "did you mean 'learning_rate'?"),
    (train, ['--max_iters', '5'], "write --max_iters=5, not '--max_iters 5'"),
    (agent, ['--dtype=fp16'], "choose one of 'auto', 'float32', 'bfloat16'"),
    (agent, ['--device=gpu'], 'not a device'),
    (agent, ['--split=tain'], "choose one of 'train', 'ood'"),
    (sample, ['--population=odd'], "choose one of '', 'train', 'ood'"),
    (sample, ['--dtype=half'], "choose one of 'auto', 'float32', 'bfloat16'"),
    (prepare_data, ['--tokenizer=gtp2'], 'unknown tokenizer'),
    (sweep, ["--dataset=['qatol']"], "'qatol': name datasets of bio, qa, qatool"),
    (sweep, ['--lr_decay=step'], "choose one of 'cosine', 'linear'"),
]
if not torch.cuda.is_available():
    REFUSED.append((train, ['--device=cuda'], 'CUDA is not available on this machine: use --device=cpu'))
    REFUSED.append((agent, ['--device=cuda:0'], 'CUDA is not available on this machine'))


@pytest.mark.parametrize('module, flags, says', REFUSED,
                         ids=[f"{m.__name__} {' '.join(f)}" for m, f, _ in REFUSED])
def test_a_bad_value_is_refused_in_one_line_before_any_work(module, flags, says):
    with pytest.raises(SystemExit) as refused:  # what each script's main does first
        configurator.main_parse(module.DEFAULTS, flags, checks=module.CHECKS)
    message = str(refused.value)
    assert message.startswith('error: ') and '\n' not in message and says in message, message


@pytest.mark.parametrize('flags, says', [
    (['--stop_metric=recall_min', '--eval_questions=0'], 'set --eval_questions=200'),
    (['config/quick.py', '--eval_questions=0'], "stop_metric='recall_min' is measured on eval_questions"),
])
def test_options_that_cannot_work_together_are_refused_naming_the_fix(flags, says, tmp_path):
    run = subprocess.run([sys.executable, 'train.py', *flags, f'--out_dir={tmp_path}', '--device=cpu'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stderr.count('\n') == 1 and says in run.stderr, run.stderr
    assert not os.listdir(tmp_path)  # refused before anything was written
