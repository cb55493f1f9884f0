"""agent.py: tool interception driven by a scripted model, hostile SQL, and a real trained model."""
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest
import torch

import agent
import configurator
import cpu_kernels
import dialog
import train
from conftest import prepare_dataset
from tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
FMT = dialog.get('itl')
USER, ASSISTANT, DATABASE, EOD = TOK.special_ids


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp('data'), 60, 20)


def people(data_dir):
    return sqlite3.connect(os.path.join(data_dir, 'people.db')).execute(
        'SELECT name, birth_date, current_address FROM people ORDER BY name').fetchall()


class ScriptedModel:
    """Stands in for GPT: each lane emits a fixed sequence of tokens, whatever it is fed.

    It records every token fed to every lane, so a test sees exactly what the model was shown;
    its next token is the script's next one after what the lane has generated so far (the
    tokens fed after the prompt, less the tool answers spliced in after each <|database|>).
    Its cache rows hold their lane's number, so it follows the agent's dropping of lanes.
    """

    def __init__(self, scripts, block_size=256):
        self.scripts = [TOK.encode(s) if isinstance(s, str) else s for s in scripts]
        self.config = type('Config', (), {'block_size': block_size})
        self.embed = torch.nn.Embedding(1, 1)
        self.fed = [[] for _ in scripts]

    def setup_cache(self, batch_size, max_len, dtype=None):
        self.row_lane = torch.arange(batch_size)
        self.cache_lengths = torch.zeros(batch_size, dtype=torch.long)

    def keep_lanes(self, keep):
        self.row_lane, self.cache_lengths = self.row_lane[keep], self.cache_lengths[keep]

    def generated(self, lane):
        fed = self.fed[lane]
        if ASSISTANT not in fed:  # still in the prompt
            return 0
        count, in_tool_answer = 0, False
        for t in fed[fed.index(ASSISTANT) + 1:]:
            if in_tool_answer:
                in_tool_answer = t != ASSISTANT
                continue
            count += 1
            in_tool_answer = t == DATABASE
        return count

    def prefill(self, idx, lengths):
        return self.decode(idx, lengths)

    def decode(self, idx, n_new, rows=None, every=False):
        rows = torch.arange(len(self.row_lane)) if rows is None else rows
        logits = torch.zeros(len(idx), idx.size(1), 260)
        for i, (row, lane) in enumerate(zip(rows.tolist(), self.row_lane[rows].tolist())):
            del self.fed[lane][self.cache_lengths[row]:]  # drafted tokens the agent took back
            assert len(self.fed[lane]) == self.cache_lengths[row]  # the agent's count of cached tokens
            script = self.scripts[lane]
            for t in idx[i, :n_new[i]].tolist():
                self.fed[lane].append(t)
                logits[i, len(self.fed[lane]) - 1 - self.cache_lengths[row], script[min(self.generated(lane), len(script) - 1)]] = 1.0
            self.cache_lengths[row] += n_new[i]
        if every:  # lane by lane, the rows of its new tokens
            return logits[torch.arange(idx.size(1)) < n_new[:, None]]
        return logits[torch.arange(len(idx)), (n_new - 1).clamp(min=0)]


def run_scripted(data_dir, questions, scripts, **kw):
    model = ScriptedModel(scripts)
    bot = agent.Agent(model, TOK, FMT, agent.SqlTool(os.path.join(data_dir, 'people.db')))
    return bot.run(questions, **kw), model


def test_tool_answers_are_spliced_in_the_right_lane_at_the_right_place(data_dir):
    (a, a_date, _), (b, _, b_city), (c, _, _) = people(data_dir)[:3]
    q = lambda n: f"SELECT {n} FROM people WHERE name = '{{}}';"
    scripts = [
        # lane 0: one tool call, then answers
        q('birth_date').format(a) + f'<|database|>{a} was born on {a_date}.<|eod|>',
        # lane 1: thinks longer before its call, so it calls the tool at a later step
        ' ' * 30 + q('current_address').format(b) + f'<|database|>{b} lives in {b_city}.<|eod|>',
        # lane 2: answers at once, no tool
        'I do not know.<|eod|>',
        # lane 3: calls the tool twice, the first time with broken SQL
        "SELEC birth_date FROM people;<|database|>" + q('birth_date').format(c) + '<|database|>done<|eod|>',
    ]
    lanes, model = run_scripted(data_dir, ['q0', 'q1', 'q2', 'q3'], scripts)
    assert lanes[0].text == (f"<|user|>q0<|assistant|>{q('birth_date').format(a)}<|database|>{a_date}"
                             f"<|assistant|>{a} was born on {a_date}.<|eod|>")
    assert lanes[1].text.endswith(f"<|database|>{b_city}<|assistant|>{b} lives in {b_city}.<|eod|>")
    assert lanes[2].text == '<|user|>q2<|assistant|>I do not know.<|eod|>' and lanes[2].tool_calls == 0
    assert lanes[2].generated == len('I do not know.') + 1  # + <|eod|>; tool answers not counted
    assert lanes[0].generated == len(TOK.encode(scripts[0]))
    assert lanes[3].text.startswith('<|user|>q3<|assistant|>SELEC birth_date FROM people;<|database|>'
                                    'error: near "SELEC": syntax error<|assistant|>SELECT')
    assert (lanes[3].tool_calls, lanes[3].tool_errors) == (2, 1)
    assert all(lane.finished for lane in lanes)
    for lane, fed in zip(lanes, model.fed):  # the model was fed each dialog but its last token,
        kept = len(TOK.encode(lane.text)) - 1  # then at most a draft of its last step, not taken
        assert TOK.decode(fed[:kept]) == lane.text[:-len('<|eod|>')] and len(fed) - kept <= 8
    assert FMT.final_answer(lanes[0].text) == f'{a} was born on {a_date}.'


def test_special_tokens_in_a_database_answer_stay_plain_text(data_dir):
    script = TOK.encode("SELECT 'x") + TOK.encode_ordinary('<|eod|>') + TOK.encode("y';<|database|>done<|eod|>")
    lanes, model = run_scripted(data_dir, ['q'], [script])
    assert lanes[0].text.endswith("<|database|>x<|eod|>y<|assistant|>done<|eod|>") and lanes[0].finished
    assert EOD not in model.fed[0]  # the model was shown the bytes '<|eod|>', not the token


def test_lanes_that_never_finish_stop_at_max_new_tokens(data_dir):
    lanes, _ = run_scripted(data_dir, ['a', 'b'], ['yes<|eod|>', 'na' * 100], max_new_tokens=20)
    assert lanes[0].finished and lanes[0].text.endswith('yes<|eod|>')
    assert not lanes[1].finished and lanes[1].text == '<|user|>b<|assistant|>' + ('na' * 10)


HOSTILE = [
    "DROP TABLE people;", "DELETE FROM people;", "INSERT INTO people VALUES ('a','b','c','d','e');",
    "ATTACH DATABASE '/tmp/x.db' AS x;", "PRAGMA writable_schema=1;", "SELECT * FROM population;",
    "SELECT 1; DROP TABLE people;", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c;",
    "SELECT * FROM people;", "SELECT name FROM people WHERE name LIKE '%';",
]


def test_hostile_sql_becomes_an_error_turn_and_the_database_is_unchanged(data_dir):
    db = os.path.join(data_dir, 'people.db')
    before = hashlib.sha256(open(db, 'rb').read()).hexdigest()
    scripts = [sql + '<|database|>ok<|eod|>' for sql in HOSTILE]
    scripts.append(TOK.encode('SELECT ') + [0xff, 0xfe] + TOK.encode('<|database|>ok<|eod|>'))  # not UTF-8
    lanes, _ = run_scripted(data_dir, ['q'] * len(scripts), scripts)
    for lane in lanes:
        db_turn = lane.text.split('<|database|>')[1].split('<|assistant|>')[0]
        assert db_turn.startswith('error: '), (lane.text, db_turn)
        assert lane.tool_errors == 1 and lane.finished
    assert hashlib.sha256(open(db, 'rb').read()).hexdigest() == before


def test_answers_are_scored_as_whole_values():
    assert agent.is_correct('Ada was born on 1/7/1975.', '1/7/1975')
    assert not agent.is_correct('Ada was born on 11/7/1975.', '1/7/1975')
    assert not agent.is_correct('Ada lives in Parisville.', 'Paris')
    assert agent.is_correct('Ada works as an engineer.', 'engineer')
    # the rule as a regular expression, on values at the ends, twice, next to letters of any script
    rule = lambda answer, value: re.search(r'(?<![\w/])' + re.escape(value) + r'(?![\w/])', answer) is not None
    cases = [('Paris', 'Paris'), ('Parisville, then Paris', 'Paris'), ('éParis', 'Paris'), ('Paris_', 'Paris'),
             ('/Paris', 'Paris'), ('Paris/', 'Paris'), ('(Paris)', 'Paris'), ('Paris-Nord', 'Paris'),
             ('1/7/1975 or 11/7/1975', '11/7/1975'), ('x11/7/1975', '11/7/1975'), ('Paris٣', 'Paris'),
             ('', 'Paris'), ('Ada', ''), ('', '')]
    for answer, value in cases:
        assert agent.is_correct(answer, value) == rule(answer, value), (answer, value)


def test_sampling_is_seeded(data_dir, tmp_path):
    torch.manual_seed(0)
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_embd=16, n_head=2, block_size=64)).eval()
    bot = agent.Agent(model, TOK, FMT)
    run = lambda seed: [l.text for l in bot.run(['Hi?'] * 4, max_new_tokens=12, temperature=1.0, top_k=20, seed=seed)]
    assert run(1) == run(1) and run(1) != run(2)
    greedy = [l.text for l in bot.run(['Hi?'] * 2, max_new_tokens=12)]
    assert greedy[0] == greedy[1]
    nucleus = [l.text for l in bot.run(['Hi?'] * 2, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3)]
    assert nucleus == greedy  # a nucleus of one token: always the most likely


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    """A small in-tool model, trained far enough to answer some questions right and some wrong."""
    out_dir = tmp_path_factory.mktemp('trained')
    cfg = configurator.parse(train.DEFAULTS, [
        f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--batch_size=32', '--max_iters=400',
        '--learning_rate=3e-3', '--min_lr=3e-4', '--warmup_iters=20', '--eval_interval=1000', '--eval_iters=1',
        '--log_interval=100', '--device=cpu', '--threads=2'])
    train.train(cfg)
    return out_dir


def test_a_trained_model_answers_by_querying_the_database(trained):
    r = subprocess.run([sys.executable, 'agent.py', f'--out_dir={trained}', '--split=train', '--n=40',
                        '--show=1'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics['n'] == 40 and metrics['tool_calls'] >= 36
    assert metrics['accuracy'] >= 0.4  # chance is ~0 (an exact date, city, ...); 0.75 measured
    assert '<|database|>' in r.stderr  # --show printed a full dialog with its tool turn


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, 'agent.py', f'--out_dir={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith('error: no checkpoint at') and 'train.py' in r.stderr


def test_a_copied_run_and_data_folder_still_evaluate_after_the_originals_are_gone(tmp_path):
    """The checkpoint holds its tokenizer (a learnt BPE here) and where its data is relative to
    itself: moved together, agent.py and sample.py find everything."""
    import shutil
    prepare_dataset(tmp_path / 'a' / 'data', 12, 4, '--bpe_vocab=300')
    train.train(configurator.parse(train.DEFAULTS, [
        f'--data_dir={tmp_path}/a/data', f'--out_dir={tmp_path}/a/runs/one', '--max_iters=2',
        '--batch_size=4', '--n_embd=16', '--eval_interval=1000', '--eval_iters=1', '--device=cpu']))
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    shutil.rmtree(tmp_path / 'a')
    out_dir = tmp_path / 'b' / 'runs' / 'one'
    r = subprocess.run([sys.executable, 'agent.py', f'--out_dir={out_dir}', '--n=4', '--max_new_tokens=30',
                        f'--records={tmp_path}/records.jsonl'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])['n'] == 4
    records = [json.loads(l) for l in open(tmp_path / 'records.jsonl')]
    assert len(records) == 4 and set(records[0]) >= {'question', 'expected', 'sql', 'database', 'answer',
                                                      'correct', 'tool_calls', 'tool_errors'}
    r = subprocess.run([sys.executable, 'sample.py', f'--out_dir={out_dir}', '--num_random=1', '--max_new_tokens=30'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'user: ' in r.stdout, r.stderr


def test_a_few_questions_are_spread_over_as_many_people_as_possible(data_dir):
    """n questions of 4n: n people, one question each, every kind of question asked; the same
    sample every time, a subset of the file in its order; n at least all: the whole file."""
    everyone = agent.read_questions(data_dir, 'ood', 10**6)
    people = {q['name'] for q in everyone}
    assert len(everyone) == 4 * len(people)
    some = agent.read_questions(data_dir, 'ood', len(people))
    assert len({q['name'] for q in some}) == len(people)
    assert {q['attribute'] for q in some} == {q['attribute'] for q in everyone}
    assert some == agent.read_questions(data_dir, 'ood', len(people))
    assert some == [q for q in everyone if q in some]
    more = agent.read_questions(data_dir, 'ood', len(people) + 3)  # three people asked twice
    assert len(more) - len({q['name'] for q in more}) == 3


def test_accuracy_interval_is_wilsons():
    low, high = agent.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook value for 8 of 10
    assert agent.wilson_interval(0, 50)[0] == 0.0 and 0.05 < agent.wilson_interval(0, 50)[1] < 0.08


def test_drafted_decoding_writes_the_same_dialogs_in_fewer_steps(trained, data_dir):
    """Greedy decoding with drafts (Drafter) against one token a step, on every question of both
    splits: token for token the same dialogs, right answers and wrong ones, in fewer passes."""
    model, ckpt, _ = agent.load_trained(str(trained), 'cpu')
    steps = []
    decode = model.decode
    model.decode = lambda *a, **kw: steps.append(1) or decode(*a, **kw)
    asked = [q for split in ('train', 'ood') for q in agent.read_questions(data_dir, split, 10**6)]
    questions = [q['question'] for q in asked]
    texts = {}
    for draft in (0, 8):
        bot = agent.make_agent(model, ckpt['tokenizer'], os.path.join(data_dir, 'people.db'), 'qatool',
                               data_dir=data_dir, draft=draft)
        steps.clear()
        texts[draft] = [lane.text for lane in bot.run(questions, max_new_tokens=100)]
        texts[draft, 'steps'] = len(steps)
    assert len(questions) >= 300 and texts[8] == texts[0]
    assert texts[8, 'steps'] < 0.8 * texts[0, 'steps']  # 0.68 measured; 0.29 on out/quick
    right = [agent.is_correct(FMT.final_answer(t), q['answer']) for t, q in zip(texts[0], asked)]
    assert 0 < sum(right) < len(right)  # some of each: the drafts were wrong often enough to matter


@pytest.mark.skipif(not cpu_kernels.attends('cpu', torch.float32, 32), reason='no C attention here')
def test_the_c_attention_writes_the_dialogs_pytorchs_attention_writes(trained, data_dir, monkeypatch):
    """cpu_kernels.attend (the default on CPU, heads of 32) against scaled_dot_product_attention,
    drafted greedy decoding of every question of both splits: the same dialogs, token for token."""
    model, ckpt, _ = agent.load_trained(str(trained), 'cpu')
    questions = [q['question'] for split in ('train', 'ood') for q in agent.read_questions(data_dir, split, 10**6)]
    bot = agent.make_agent(model, ckpt['tokenizer'], os.path.join(data_dir, 'people.db'), 'qatool', data_dir=data_dir)
    ours = [lane.text for lane in bot.run(questions, max_new_tokens=100)]
    assert model.blocks[0].attn.keys_in_tiles  # the run above attended in C
    monkeypatch.setattr(cpu_kernels, 'attends', lambda *args: False)
    theirs = [lane.text for lane in bot.run(questions, max_new_tokens=100)]
    assert not model.blocks[0].attn.keys_in_tiles and len(questions) >= 300 and ours == theirs


def test_a_draft_is_the_tokens_after_the_latest_earlier_occurrence():
    drafter = agent.Drafter(examples=[TOK.encode("name = 'Ada';<|database|>")], n=3, k=4, stop_ids=[DATABASE])

    def drafts(lanes, room):
        ids = [TOK.encode(t) for t in lanes]
        tokens = torch.zeros(len(ids), 40, dtype=torch.long)
        for b, t in enumerate(ids):
            tokens[b, :len(t)] = torch.tensor(t)
        draft, count = drafter(tokens, torch.tensor([len(t) for t in ids]), torch.tensor(room))
        return [TOK.decode(d[:c].tolist()) for d, c in zip(draft, count)]

    # the lane's own text first, its latest occurrence; then the examples; the room; none found
    assert drafts(["Smith? Ada Smith? name = 'Ada Smith", "xyz 'Ada Jones; 'Ad", "WHERE name = '", "abcabc",
                   "WHERE name = 'Bo"], [8, 8, 8, 2, 8]) == ['? na', 'a Jo', "Ada'", 'ab', '']
    assert drafts(["name = 'Ada"], [8]) == ["';"]  # up to the stop token, which the model writes
    # no n = 3 match in the lane nor the examples: its last 2 tokens in its own text
    assert drafts(["Anton? name = 'An", "Anton? name = 'Bn"], [8, 8]) == ['ton?', '']
