"""
Ask a trained model questions and watch it use the database.

    python sample.py --out_dir=out/quick --question="Where does Ada Smith live?"
    python sample.py --out_dir=out/quick --question="..." --question="..."   # one batch
    python sample.py --out_dir=out/quick --questions_file=questions.txt
    python sample.py --out_dir=out/quick                     # a few random people from the db
    python sample.py --out_dir=out/quick --interactive       # questions from stdin
    python sample.py --out_dir=out/quick --db=other/people.db  # a database it never saw
"""
import os
import random
import re
import sqlite3
import sys

import agent
import configurator
from model import pick_device
from prepare_data import ATTRIBUTES, question_answer

DEFAULTS = dict(
    out_dir='out',
    db='',                  # '' = the people.db the model was trained next to
    questions_file='',      # one question per line
    interactive=False,
    num_random=3,           # with no question: this many random questions from the database
    population='',          # ... about 'train' or 'ood' people only ('' = anyone)
    max_new_tokens=160,
    temperature=0.0,
    top_k=0,
    seed=1337,
    device='auto',
)

ROLE_LABELS = {'<|user|>': 'user', '<|assistant|>': 'assistant', '<|database|>': 'database'}


def format_dialog(text):
    """A dialog's text as labelled lines: the question, the SQL, the database's answer, the answer."""
    parts = re.split(r'(<\|user\|>|<\|assistant\|>|<\|database\|>|<\|eod\|>)', text)
    lines = []
    for i in range(1, len(parts), 2):  # parts: '', special, content, special, content, ...
        special, content = parts[i], parts[i + 1]
        if special == '<|eod|>':
            continue
        label = ROLE_LABELS[special]
        if label == 'assistant' and i + 2 < len(parts) and parts[i + 2] == '<|database|>':
            label = 'sql'
        lines.append(f'{label:>9}: {content}')
    return '\n'.join(lines)


def random_questions(db_path, n, seed, population=''):
    """n questions about random people of the database (of one population, if given)."""
    db = sqlite3.connect(f'file:{db_path}?mode=ro', uri=True)
    query = 'SELECT p.* FROM people p' + (' JOIN population USING (name) WHERE split = ?' if population else '')
    args = (population,) if population else ()
    count = db.execute(f'SELECT count(*) FROM ({query})', args).fetchone()[0]
    if not count:
        raise ValueError(f"{db_path} has no {population or ''} people to ask about")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        row = db.execute(f'{query} LIMIT 1 OFFSET ?', args + (rng.randrange(count),)).fetchone()
        attr = rng.randrange(len(ATTRIBUTES))
        out.append(question_answer(ATTRIBUTES[attr], row[0], row[1 + attr])[0])
    db.close()
    return out


def main(argv):
    asked = [a.split('=', 1)[1] for a in argv if a.startswith('--question=')]
    cfg = configurator.main_parse(DEFAULTS, [a for a in argv if not a.startswith('--question=')])
    device = pick_device(cfg.device)
    try:
        model, ckpt = agent.load_checkpoint(cfg.out_dir, device)
        db_path = cfg.db or os.path.join(ckpt['config']['data_dir'], 'people.db')
        bot = agent.make_agent(model, ckpt['tokenizer']['tokenizer'], db_path, ckpt['config']['dataset'])
        if cfg.questions_file:
            with open(cfg.questions_file) as f:
                asked += [line.strip() for line in f if line.strip()]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                    seed=cfg.seed)
    if cfg.interactive:
        print('ask a question (empty line or ctrl-d to quit)', file=sys.stderr)
        for line in sys.stdin:
            if not line.strip():
                break
            print(format_dialog(bot.run([line.strip()], **sampling)[0].text) + '\n', flush=True)
        return
    try:
        asked = asked or random_questions(db_path, cfg.num_random, cfg.seed, cfg.population)
    except (sqlite3.Error, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for lane in bot.run(asked, **sampling):
        print(format_dialog(lane.text) + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
