"""prepare_data.py on real files: the SQLite database, the JSONL dialogs and the token shards."""
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest

import configurator
import dialog
import prepare_data as pd
import tokenizer as tok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare(out_dir, **overrides):
    cfg = configurator.parse(pd.DEFAULTS, [f'--out_dir={out_dir}', '--n_people=300', '--n_ood=100']
                             + [f'--{k}={v}' for k, v in overrides.items()])
    return pd.prepare(cfg)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('data')
    prepare(out)
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def people(data_dir, split):
    db = sqlite3.connect(data_dir / 'people.db')
    return db.execute('SELECT p.* FROM people p JOIN population s USING (name) '
                      'WHERE s.split = ? ORDER BY name', (split,)).fetchall()


def tree_digest(path):
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in sorted(os.listdir(path))
            if f != 'meta.json'}  # meta.json records out_dir, which differs


def meta_elsewhere(meta):
    """meta.json without what names the folder it was written to."""
    return {**meta, 'options': {k: v for k, v in meta['options'].items() if k != 'out_dir'}}


def test_same_seed_same_bytes_other_seed_other_people(tmp_path, data_dir):
    meta = prepare(tmp_path / 'a')
    assert tree_digest(tmp_path / 'a') == tree_digest(data_dir)
    assert meta_elsewhere(meta) == meta_elsewhere(json.loads((data_dir / 'meta.json').read_text()))
    prepare(tmp_path / 'b', seed=1)
    assert people(tmp_path / 'b', 'train') != people(data_dir, 'train')


def test_people_unique_attributes_in_range_and_ood_first_names_disjoint(data_dir):
    train, ood = people(data_dir, 'train'), people(data_dir, 'ood')
    assert len(train) == 300 and len(ood) == 100
    assert len({p[0] for p in train + ood}) == 400
    for name, date, *_ in train + ood:
        day, month, year = map(int, date.split('/'))
        assert 1 <= day <= 28 and 1 <= month <= 12 and 1950 <= year <= 2000
    assert not {p[0].split()[0] for p in train} & {p[0].split()[0] for p in ood}
    atoms = pd.load_atoms()
    assert all(p[2] in atoms['countries'] and p[3] in atoms['cities'] and p[4] in atoms['occupations']
               for p in train + ood)


def test_alpha_zero_makes_families_share_attributes(tmp_path):
    prepare(tmp_path, alpha=0.0, n_people=2000)
    by_family = {}
    for name, _, place, city, job in people(tmp_path, 'train'):
        by_family.setdefault(name.split()[1], set()).add((place, city, job))
    assert all(len(v) == 1 for v in by_family.values())
    assert max(len(v) for v in by_family.values()) == 1 and len(by_family) > 100


def test_every_tool_query_returns_its_database_turn(data_dir):
    from tool import format_rows
    db = sqlite3.connect(f"file:{data_dir / 'people.db'}?mode=ro", uri=True)
    truth = {p[0]: dict(zip(pd.ATTRIBUTES, p[1:])) for split in pd.SPLITS for p in people(data_dir, split)}
    for split in pd.SPLITS:
        dialogs = read_jsonl(data_dir / f'qatool_{split}.jsonl')
        assert len(dialogs) == 4 * (300 if split == 'train' else 100)
        for d in dialogs:
            user, rest = d['text'].removeprefix('<|user|>').split('<|assistant|>', 1)
            sql, rest = rest.split('<|database|>')
            db_turn, answer = rest.split('<|assistant|>')
            assert answer.endswith('<|eod|>')
            assert format_rows(db.execute(sql).fetchall()) == db_turn
            name = sql.split("name = '", 1)[1][:-2].replace("''", "'")
            attr = sql.split()[1]
            assert name in user and db_turn == truth[name][attr] and truth[name][attr] in answer


def test_sql_quotes_apostrophes(tmp_path):
    from tool import format_rows
    db = sqlite3.connect(tmp_path / 'x.db')
    db.execute('CREATE TABLE people(name TEXT PRIMARY KEY, birth_date TEXT)')
    db.execute("INSERT INTO people VALUES ('Ada O''Brien', '1/2/1970')")
    dialogs, _ = pd.render_dialogs([("Ada O'Brien", '1/2/1970', 'France', 'Paris', 'engineer')], dialog.get('itl'))
    sql = dialogs['qatool'][0].split('<|assistant|>')[1].split('<|database|>')[0]
    assert sql == "SELECT birth_date FROM people WHERE name = 'Ada O''Brien';"
    assert format_rows(db.execute(sql).fetchall()) == '1/2/1970'
    assert "works as an engineer." in dialogs['qa'][3]


def test_questions_hold_expected_answers(data_dir):
    questions = read_jsonl(data_dir / 'questions_ood.jsonl')
    truth = {p[0]: dict(zip(pd.ATTRIBUTES, p[1:])) for p in people(data_dir, 'ood')}
    assert len(questions) == 400
    for q in questions:
        assert q['answer'] == truth[q['name']][q['attribute']]
        assert q['name'] in q['question'] and q['answer'] in q['target']


@pytest.mark.parametrize('dataset', pd.DATASETS)
def test_shard_decodes_to_jsonl_and_masks_exactly_the_assistant(data_dir, dataset):
    tokens, mask, starts, header = pd.read_shard(data_dir / f'{dataset}_train.bin')
    assert header['vocab_size'] == 260 and header['token_dtype'] == 'uint16'
    texts = [d['text'] for d in read_jsonl(data_dir / f'{dataset}_train.jsonl')]
    ends = list(starts[1:]) + [len(tokens)]
    byte_tok = tok.ByteTokenizer()
    for text, lo, hi in zip(texts, starts, ends):
        assert byte_tok.decode(tokens[lo:hi].tolist()) == text
        # the assistant's tokens, read back: every assistant turn, with the token ending it
        expected = ''.join(re.findall(r'<\|assistant\|>(.*?(?:<\|database\|>|<\|eod\|>))', text))
        assert expected.count('<|eod|>') == 1
        assert byte_tok.decode(tokens[lo:hi][mask[lo:hi]].tolist()) == expected


def test_byte_encode_of_one_text_is_the_shards_encoding():
    """encode() skips the array for text with no special token (a tool's answer): same ids."""
    byte_tok = tok.ByteTokenizer()
    texts = ['1975-07-11', 'no rows', 'Zoë Ångström | 中', '', '<|user|>Who?<|assistant|>',
             'SELECT x FROM people<|database|>', 'a\x01b\x04', '<|eod', '|>']
    for text in texts:
        assert byte_tok.encode(text) == byte_tok.encode_concat([text]).tolist()
    assert byte_tok.encode('ab<|eod|>') == [97, 98, 259] and byte_tok.encode('é') == [195, 169]


def test_truncated_or_altered_shard_is_rejected(tmp_path, data_dir):
    raw = (data_dir / 'qa_train.bin').read_bytes()
    cases = {'truncated': raw[:-10], 'short': raw[:100], 'magic': b'\0' * 8 + raw[8:],
             'token flipped': raw[:300] + bytes([raw[300] ^ 1]) + raw[301:],
             'version': raw[:8] + (99).to_bytes(8, 'little') + raw[16:]}
    for problem, data in cases.items():
        path = tmp_path / f'{problem}.bin'
        path.write_bytes(data)
        with pytest.raises(pd.ShardError, match=str(path)):
            pd.read_shard(path)


def test_meta_names_the_dialog_format_its_special_tokens_and_the_byte_tokenizer(data_dir):
    meta = json.loads((data_dir / 'meta.json').read_text())
    fmt = dialog.get(meta['format'])
    assert meta['format'] == 'itl' and meta['format_version'] == pd.SHARD_VERSION
    assert meta['special_tokens'] == dict(zip(fmt.special_tokens, range(256, 260)))
    assert meta['tokenizer'] == {'kind': 'byte', 'vocab_size': 260}  # as before ranks were stored
    assert tok.from_meta(meta['tokenizer']).special_ids == tok.ByteTokenizer.special_ids
    text = read_jsonl(data_dir / 'qatool_train.jsonl')[0]['text']
    assert [role for role, _ in fmt.turns(text)] == ['user', 'sql', 'database', 'assistant']


def test_bpe_dataset_moved_elsewhere_still_loads_its_tokenizer(tmp_path):
    meta = prepare(tmp_path / 'a', bpe_vocab=400)
    assert meta['tokenizer']['kind'] == 'tiktoken' and meta['vocab_size'] == 404
    written = tok.from_meta(meta['tokenizer'])
    moved = tmp_path / 'b'
    os.rename(tmp_path / 'a', moved)  # the original folder is gone
    raw = (moved / 'meta.json').read_text()
    assert str(tmp_path / 'a') not in raw.replace(json.dumps(str(tmp_path / 'a')), '')  # but out_dir
    # a dataset written before describe() held the merges names its file: still loaded from it
    old_form = tok.from_meta({'kind': 'tiktoken', 'name': 'tokenizer', 'vocab_size': 404,
                              'file': str(moved / 'tokenizer.tiktoken')})
    assert json.loads(raw)['tokenizer']['ranks'] == (moved / 'tokenizer.tiktoken').read_text()
    os.remove(moved / 'tokenizer.tiktoken')  # the description alone rebuilds it: no file, no network
    bpe = tok.from_meta(json.loads(raw)['tokenizer'])
    text = read_jsonl(moved / 'qatool_train.jsonl')[0]['text']
    ids = bpe.encode(text)
    assert ids == written.encode(text) == old_form.encode(text) and bpe.special_ids == written.special_ids
    assert bpe.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # the merges are used
    tokens, mask, starts, _ = pd.read_shard(moved / 'qatool_train.bin')
    assert bpe.decode(tokens[:starts[1]].tolist()) == text
    assert bpe.decode(tokens[:starts[1]][mask[:starts[1]]].tolist()).endswith('<|database|>' + text.split('<|assistant|>')[-1])


def test_tiktoken_description_keeps_the_encodings_own_special_tokens(tmp_path):
    # as gpt2's <|endoftext|>: ours come after it, and from_meta puts them at the same ids
    ranks = tok.train_bpe(['Ada Smith lives in Paris. Ada Smith lives in Rome.'], 270)
    enc = tok.TiktokenTokenizer('toy', ranks, tok.BPE_PATTERN, {'<|endoftext|>': len(ranks)})
    desc = json.loads(json.dumps(enc.describe()))
    assert set(desc) == {'kind', 'name', 'vocab_size', 'pattern', 'base_special_tokens',
                         'appended_special_tokens', 'ranks'}
    again = tok.from_meta(desc)
    assert again.special_ids == enc.special_ids == tuple(range(len(ranks) + 1, len(ranks) + 5))
    text = '<|user|>Where does Ada Smith live?<|assistant|>Ada Smith lives in Paris.<|eod|>'
    assert again.encode(text) == enc.encode(text) and again.decode(enc.encode(text)) == text
    with pytest.raises(ValueError, match='404'):
        tok.from_meta({**desc, 'vocab_size': 404})
    # a pretrained model's tokenizer has its own special tokens and none of ours appended
    own = tok.TiktokenTokenizer('toy', ranks, tok.BPE_PATTERN, {'<|im_end|>': len(ranks)}, appended=())
    again = tok.from_meta(json.loads(json.dumps(own.describe())))
    assert again.vocab_size == len(ranks) + 1 and again.encode('Ada<|im_end|>')[-1] == len(ranks)


def test_existing_out_dir_is_kept_without_overwrite(data_dir):
    before = tree_digest(data_dir)
    with pytest.raises(FileExistsError, match='--overwrite'):
        prepare(data_dir)
    assert tree_digest(data_dir) == before


def test_command_line_rejects_unknown_option_and_bad_type(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, 'prepare_data.py', *args], cwd=ROOT,
                                       capture_output=True, text=True)
    r = run('--n_peple=5', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and "unknown config key 'n_peple'" in r.stderr and 'n_people' in r.stderr
    r = run('--n_people=many', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and "'n_people' expects int" in r.stderr
    r = run('--tokenizer=gtp2', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and 'tiktoken encoding (gpt2' in r.stderr and 'Traceback' not in r.stderr
    assert not os.listdir(tmp_path)


def test_check_name_accepts_byte_encodings_and_files_and_names_the_valid_forms(tmp_path):
    path = tmp_path / 'mine.tiktoken'
    tok.write_tiktoken_file(tok.train_bpe(['Ada Smith'], 258), str(path))
    for value in ('byte', 'gpt2', 'cl100k_base', str(path)):
        assert tok.check_name(value) is None
    for value in ('bytes', 'gtp2', str(tmp_path / 'missing.tiktoken')):
        assert all(form in tok.check_name(value) for form in ("'byte'", 'cl100k_base', '.tiktoken file'))
    # prepare_data.py's check also takes pretrained models, and names them when refusing
    assert pd.CHECKS['tokenizer']('gpt2') is None and "'smollm2-135m'" in pd.CHECKS['tokenizer']('gtp2')
    assert pd.CHECKS['tokenizer'](str(tmp_path / 'missing.gguf')) is not None


def test_offline_tiktoken_name_explains_how_to_provide_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path))  # empty cache: no network here
    try:
        tok.load_tiktoken('gpt2')
    except RuntimeError as e:
        assert '--tokenizer=/path/to/gpt2.tiktoken' in str(e)
