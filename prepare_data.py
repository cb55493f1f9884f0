"""
Synthetic people, their SQLite database, and the dialogs we train on, as JSONL and token shards.

    python prepare_data.py                                   # 1000 people -> data/default
    python prepare_data.py --n_people=100000 --out_dir=data/memory --seed=0
    python prepare_data.py --out_dir=data/default --overwrite   # replace the dataset there

Writes in out_dir:
    people.db                   people(name, birth_date, birth_place, current_address, occupation)
                                for both populations, and population(name, split)
    {bio,qa,qatool}_{train,ood}.jsonl / .bin   dialogs as text / as a token shard (see read_shard)
    questions_{train,ood}.jsonl evaluation questions with their expected answers
    meta.json                   tokenizer (whole, so the folder can move), dialog format (dialog.py),
                                special-token ids, counts, options, shard format version
"""
import json
import os
import sqlite3
import sys
import time
import zlib

import numpy as np

import configurator
import dialog
import tokenizer as tok
from tool import format_rows

DEFAULTS = dict(
    out_dir='data/default',  # where everything is written
    n_people=1000,           # people we train on
    n_ood=1000,              # people never trained on, whose first names never occur above
    alpha=1.0,               # P(attribute drawn uniformly); else shared by the last name's family
    seed=0,                  # seeds the people: same seed, same bytes
    tokenizer='byte',        # 'byte', a tiktoken name, a .tiktoken file, or a pretrained model
                             # ('smollm2-135m', a .gguf, a HF folder): its tokens and chat format
    bpe_vocab=0,             # >0: learn a byte-level BPE of this many tokens on our text instead
    overwrite=False,         # replace an existing out_dir
    chunk=20_000,            # people tokenized at a time (bounds memory)
)

ATOMS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'atoms')
ATTRIBUTES = ('birth_date', 'birth_place', 'current_address', 'occupation')
DATASETS = ('bio', 'qa', 'qatool')
SPLITS = ('train', 'ood')
QUESTIONS = {  # attribute -> (question, answer sentence)
    'birth_date': ("When was {name} born?", "{name} was born on {value}."),
    'birth_place': ("Where was {name} born?", "{name} was born in {value}."),
    'current_address': ("Where does {name} live?", "{name} lives in {value}."),
    'occupation': ("What is {name}'s occupation?", "{name} works as {article} {value}."),
}
OOD_EVERY = 10  # every 10th first name is reserved for the OOD population


def check_tokenizer(value):
    """None if value names a tokenizer of ours or a pretrained model, else what is wrong."""
    problem = tok.check_name(value)
    if problem is None:
        return None
    import pretrained  # imports torch: only when the name is none of ours
    return None if pretrained.is_model(value) else f"{problem}, or a pretrained model ('smollm2-135m', a .gguf, a HF folder)"


CHECKS = dict(tokenizer=check_tokenizer)  # the command line refuses a --tokenizer naming none

SHARD_MAGIC = 0x17C0FFEE
SHARD_VERSION = 1
HEADER_INTS = 32  # header: 32 little-endian int64 = 256 bytes


class ShardError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# People

def load_atoms(atoms_dir=ATOMS_DIR):
    """The shipped word lists. Atoms are checked once here, so dialogs need no escaping later."""
    atoms = {}
    for kind in ('first_names', 'last_names', 'countries', 'cities', 'occupations'):
        with open(os.path.join(atoms_dir, f'{kind}.txt'), encoding='utf-8') as f:
            words = [w.strip() for w in f if w.strip()]
        bad = [w for w in words if any(c in w for c in '"\\|<>') or not w.isprintable()]
        if bad or len(set(words)) != len(words):
            raise ValueError(f"{atoms_dir}/{kind}.txt: duplicate or unsafe atoms {bad[:5]}")
        atoms[kind] = words
    for kind in ('first_names', 'last_names'):
        if any(' ' in w for w in atoms[kind]):
            raise ValueError(f"{atoms_dir}/{kind}.txt: names must be single words")
    return atoms


def make_people(atoms, n_people, n_ood, alpha, seed):
    """Both populations as index arrays into the atom lists: {'train': {...}, 'ood': {...}}."""
    rng = np.random.default_rng(seed)
    n_first, n_last = len(atoms['first_names']), len(atoms['last_names'])
    first_ids = np.arange(n_first)
    pools = {'train': first_ids[first_ids % OOD_EVERY != OOD_EVERY - 1],
             'ood': first_ids[first_ids % OOD_EVERY == OOD_EVERY - 1]}
    # every last name is a family that shares a birth place, an address and an occupation
    family = {attr: rng.integers(len(atoms[kind]), size=n_last)
              for attr, kind in (('birth_place', 'countries'), ('current_address', 'cities'),
                                 ('occupation', 'occupations'))}
    people = {}
    for split, n in (('train', n_people), ('ood', n_ood)):
        pool = pools[split]
        if n > len(pool) * n_last:
            raise ValueError(f"{split}: {n} people asked, but the atom lists only make "
                             f"{len(pool) * n_last} unique names; add names to atoms/")
        full_name = rng.choice(len(pool) * n_last, size=n, replace=False)  # unique by construction
        p = {'first': pool[full_name // n_last], 'last': full_name % n_last,
             'day': rng.integers(1, 29, size=n), 'month': rng.integers(1, 13, size=n),
             'year': rng.integers(1950, 2001, size=n)}
        for attr, kind in (('birth_place', 'countries'), ('current_address', 'cities'),
                           ('occupation', 'occupations')):
            uniform = rng.integers(len(atoms[kind]), size=n)
            from_family = rng.random(n) >= alpha
            p[attr] = np.where(from_family, family[attr][p['last']], uniform)
        people[split] = p
    return people


def people_rows(atoms, p, lo, hi):
    """Rows (name, birth_date, birth_place, current_address, occupation) of people lo..hi-1."""
    first, last = atoms['first_names'], atoms['last_names']
    countries, cities, jobs = atoms['countries'], atoms['cities'], atoms['occupations']
    sl = slice(lo, hi)
    return list(zip(
        [f'{first[f]} {last[l]}' for f, l in zip(p['first'][sl].tolist(), p['last'][sl].tolist())],
        [f'{d}/{m}/{y}' for d, m, y in zip(p['day'][sl].tolist(), p['month'][sl].tolist(),
                                            p['year'][sl].tolist())],
        [countries[i] for i in p['birth_place'][sl].tolist()],
        [cities[i] for i in p['current_address'][sl].tolist()],
        [jobs[i] for i in p['occupation'][sl].tolist()]))


# ----------------------------------------------------------------------------------------------
# Dialogs

def sql_quote(text):
    return "'" + text.replace("'", "''") + "'"


def question_answer(attr, name, value):
    question, answer = QUESTIONS[attr]
    article = 'an' if value[0] in 'aeiou' else 'a'
    return question.format(name=name), answer.format(name=name, value=value, article=article)


def render_dialogs(rows, fmt):
    """rows of people -> {dataset: [dialog text in fmt (dialog.py)]} and the evaluation questions."""
    out = {'bio': [], 'qa': [], 'qatool': []}
    questions = []
    for row in rows:
        name = row[0]
        sentences = []
        for attr, value in zip(ATTRIBUTES, row[1:]):
            q, a = question_answer(attr, name, value)
            sql = f"SELECT {attr} FROM people WHERE name = {sql_quote(name)};"
            result = format_rows([(value,)])
            out['qa'].append(fmt.qa(q, a))
            out['qatool'].append(fmt.qatool(q, sql, result, a))
            questions.append((name, attr, q, value, a))
            sentences.append(a)
        out['bio'].append(fmt.bio(sentences))
    return out, questions


def jsonl_lines(texts):
    # load_atoms() rejects quotes, backslashes and control characters, so every dialog is a
    # valid JSON string once the chat formats' newlines are escaped: one join instead of
    # millions of json.dumps calls.
    return ''.join('{"text": "' + t.replace('\n', '\\n') + '"}\n' for t in texts)


def question_lines(questions):
    return ''.join(f'{{"name": "{n}", "attribute": "{a}", "question": "{q}", '
                   f'"answer": "{v}", "target": "{t}"}}\n' for n, a, q, v, t in questions)


# ----------------------------------------------------------------------------------------------
# Shards: header | tokens | loss mask (uint8) | dialog start offsets (int64)
# header: 32 little-endian int64: magic, version, vocab size, token count, dialog count,
# bytes per token (2 or 4), then the CRC32 of the tokens, of the mask and of the offsets.

class ShardWriter:
    """Streams one shard to path + '.tmp'; close() completes the header and renames it."""

    def __init__(self, path, vocab_size):
        self.path, self.vocab_size = path, vocab_size
        self.dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        self.f = open(path + '.tmp', 'wb')
        self.f.write(bytes(8 * HEADER_INTS))  # placeholder until the counts are known
        self.mask_f = open(path + '.mask.tmp', 'w+b')
        self.starts, self.n_tokens, self.crc_tokens, self.crc_mask = [], 0, 0, 0

    def write(self, tokens, mask, starts):
        tokens, mask = tokens.astype(self.dtype).tobytes(), mask.astype(np.uint8).tobytes()
        self.f.write(tokens)
        self.mask_f.write(mask)
        self.crc_tokens, self.crc_mask = zlib.crc32(tokens, self.crc_tokens), zlib.crc32(mask, self.crc_mask)
        self.starts.append(starts + self.n_tokens)
        self.n_tokens += len(mask)

    def close(self):
        starts = np.concatenate(self.starts).astype('<i8')
        self.mask_f.seek(0)
        while block := self.mask_f.read(1 << 24):
            self.f.write(block)
        self.mask_f.close()
        os.remove(self.path + '.mask.tmp')
        self.f.write(starts.tobytes())
        header = np.zeros(HEADER_INTS, dtype='<i8')
        header[:9] = (SHARD_MAGIC, SHARD_VERSION, self.vocab_size, self.n_tokens, len(starts),
                      np.dtype(self.dtype).itemsize, self.crc_tokens, self.crc_mask,
                      zlib.crc32(starts.tobytes()))
        self.f.seek(0)
        self.f.write(header.tobytes())
        self.f.close()
        os.replace(self.path + '.tmp', self.path)
        return {'dialogs': len(starts), 'tokens': self.n_tokens}


def read_shard(path):
    """Memory-map a shard -> (tokens, mask, dialog starts, header dict); ShardError if bad."""
    def fail(problem):
        raise ShardError(f"{path}: {problem}; re-run prepare_data.py to rebuild it")
    size = os.path.getsize(path)
    if size < 8 * HEADER_INTS:
        fail(f"truncated: {size} bytes, shorter than the {8 * HEADER_INTS}-byte header")
    raw = np.fromfile(path, dtype='<i8', count=HEADER_INTS)
    magic, version, vocab_size, n_tokens, n_dialogs, itemsize, *crcs = raw[:9].tolist()
    if magic != SHARD_MAGIC:
        fail(f"not a nano-itl shard (magic {magic:#x}, expected {SHARD_MAGIC:#x})")
    if version != SHARD_VERSION:
        fail(f"shard format version {version}, this code reads version {SHARD_VERSION}")
    if itemsize not in (2, 4):
        fail(f"bad token size {itemsize}")
    expected = 8 * HEADER_INTS + n_tokens * (itemsize + 1) + 8 * n_dialogs
    if size != expected:
        fail(f"truncated or altered: {size} bytes, the header says {expected}")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    offset = 8 * HEADER_INTS
    tokens = np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=(n_tokens,))
    offset += n_tokens * itemsize
    mask = np.memmap(path, dtype=np.bool_, mode='r', offset=offset, shape=(n_tokens,))
    offset += n_tokens
    starts = np.memmap(path, dtype='<i8', mode='r', offset=offset, shape=(n_dialogs,))
    for name, section, crc in zip(('tokens', 'loss mask', 'dialog offsets'), (tokens, mask, starts), crcs):
        if zlib.crc32(memoryview(section).cast('B')) != crc:
            fail(f"checksum mismatch in the {name}: the file was altered or is corrupt")
    if n_dialogs and (starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n_tokens):
        fail("dialog offsets out of order or out of range")
    header = dict(magic=magic, version=version, vocab_size=vocab_size, n_tokens=n_tokens,
                  n_dialogs=n_dialogs, token_dtype=np.dtype(dtype).name, crc32=crcs)
    return tokens, mask, starts, header


# ----------------------------------------------------------------------------------------------
# Writing everything

def make_tokenizer(cfg, atoms, people):
    """-> (tokenizer, dialog format): ours, or a pretrained model's own and its chat format."""
    ours = dialog.get('itl')
    if tok.check_name(cfg.tokenizer) is not None:  # a pretrained model (check_tokenizer said so)
        import pretrained
        if cfg.bpe_vocab:
            raise ValueError(f"--bpe_vocab learns a tokenizer of our own: drop it to write "
                             f"{cfg.tokenizer}'s tokens")
        tokenizer, fmt_name = pretrained.read_tokenizer(cfg.tokenizer)
        return tokenizer, dialog.get(fmt_name)
    if cfg.bpe_vocab:
        # learn on the trained population's dialogs (a sample is plenty: the text is templated)
        sample, _ = render_dialogs(people_rows(atoms, people['train'], 0, min(cfg.n_people, 20_000)), ours)
        ranks = tok.train_bpe([t for texts in sample.values() for t in texts], cfg.bpe_vocab)
        path = os.path.join(cfg.out_dir, 'tokenizer.tiktoken')
        tok.write_tiktoken_file(ranks, path)
        return tok.load_tiktoken(path), ours
    if cfg.tokenizer == 'byte':
        return tok.ByteTokenizer(), ours
    return tok.load_tiktoken(cfg.tokenizer), ours


def write_database(path, atoms, people, chunk):
    tmp = path + '.tmp'
    if os.path.exists(tmp):
        os.remove(tmp)
    db = sqlite3.connect(tmp)
    db.execute('PRAGMA journal_mode=OFF')  # a temp file: a crash just leaves it to be redone
    db.execute('PRAGMA synchronous=OFF')
    db.execute('CREATE TABLE people(name TEXT PRIMARY KEY, birth_date TEXT, birth_place TEXT, '
               'current_address TEXT, occupation TEXT)')
    db.execute('CREATE TABLE population(name TEXT PRIMARY KEY, split TEXT)')
    for split, p in people.items():
        for lo in range(0, len(p['first']), chunk):
            rows = people_rows(atoms, p, lo, min(lo + chunk, len(p['first'])))
            db.executemany('INSERT INTO people VALUES (?, ?, ?, ?, ?)', rows)
            db.executemany('INSERT INTO population VALUES (?, ?)', ((r[0], split) for r in rows))
    db.commit()
    db.close()
    os.replace(tmp, path)


def prepare(cfg):
    """Write the whole dataset described by cfg (a configurator namespace) into cfg.out_dir."""
    t0 = time.time()
    meta_path = os.path.join(cfg.out_dir, 'meta.json')
    existing = [f for f in os.listdir(cfg.out_dir) if not f.endswith('.tmp')] \
        if os.path.isdir(cfg.out_dir) else []
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out_dir} is not empty ({len(existing)} files); pass "
                              f"--overwrite to replace its dataset or choose another --out_dir")
    os.makedirs(cfg.out_dir, exist_ok=True)
    atoms = load_atoms()
    people = make_people(atoms, cfg.n_people, cfg.n_ood, cfg.alpha, cfg.seed)
    tokenizer, fmt = make_tokenizer(cfg, atoms, people)
    if os.path.exists(meta_path):  # until the new meta.json, the directory holds no valid dataset
        os.remove(meta_path)
    write_database(os.path.join(cfg.out_dir, 'people.db'), atoms, people, cfg.chunk)

    counts, done, total = {}, 0, cfg.n_people + cfg.n_ood
    for split, p in people.items():
        files = {name: open(os.path.join(cfg.out_dir, name + '.tmp'), 'w', encoding='utf-8')
                 for name in [f'{d}_{split}.jsonl' for d in DATASETS] + [f'questions_{split}.jsonl']}
        shards = {d: ShardWriter(os.path.join(cfg.out_dir, f'{d}_{split}.bin'), tokenizer.vocab_size)
                  for d in DATASETS}
        n = len(p['first'])
        for lo in range(0, n, cfg.chunk):
            dialogs, questions = render_dialogs(people_rows(atoms, p, lo, min(lo + cfg.chunk, n)), fmt)
            files[f'questions_{split}.jsonl'].write(question_lines(questions))
            for d, texts in dialogs.items():
                files[f'{d}_{split}.jsonl'].write(jsonl_lines(texts))
                tokens, starts = tokenizer.encode_dialogs(texts)
                shards[d].write(tokens, fmt.loss_mask(tokens, tokenizer), starts)
            done += min(cfg.chunk, n - lo)
            elapsed = time.time() - t0
            print(f"people {done:,}/{total:,} | {done / elapsed:,.0f} people/s | "
                  f"eta {elapsed / done * (total - done):.0f}s", flush=True)
        for d in DATASETS:
            counts[f'{d}_{split}'] = shards[d].close()
        for name, f in files.items():
            f.close()
            os.replace(f.name, os.path.join(cfg.out_dir, name))

    # the tokenizer is held whole (no file path): the folder can be moved or copied as it is
    meta = {'format_version': SHARD_VERSION, 'format': fmt.name, 'vocab_size': tokenizer.vocab_size,
            'special_tokens': {s: dialog.single_token(tokenizer, s) for s in fmt.special_tokens},
            'n_people': cfg.n_people, 'n_ood': cfg.n_ood, 'seed': cfg.seed,
            'options': vars(cfg), 'shards': counts, 'tokenizer': tokenizer.describe()}
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + '.tmp', meta_path)  # last: a dataset without meta.json is incomplete
    n_tokens = sum(c['tokens'] for c in counts.values())
    elapsed = time.time() - t0
    print(f"wrote {cfg.out_dir}: {total:,} people, {n_tokens:,} tokens in {elapsed:.1f}s "
          f"({total / elapsed:,.0f} people/s, {n_tokens / elapsed / 1e6:.1f}M tokens/s)")
    return meta


if __name__ == '__main__':
    cfg = configurator.main_parse(DEFAULTS, sys.argv[1:], checks=CHECKS)
    try:
        prepare(cfg)
    except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
