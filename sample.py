"""
Ask a trained model questions and watch it use the database.

    python sample.py --out_dir=out/quick --question="Where does Ada Smith live?"
    python sample.py --out_dir=out/quick --question="..." --question="..."   # one batch
    python sample.py --out_dir=out/quick --questions_file=questions.txt
    python sample.py --out_dir=out/quick                     # a few random people from the db
    python sample.py --out_dir=out/quick --interactive       # questions from stdin
    python sample.py --init_from=smollm2-135m --interactive  # a chat: the conversation is kept
    python sample.py --out_dir=out/quick --db=other/people.db  # a database it never saw
    python sample.py --init_from=smollm2-135m --question="What is the capital of France?"
"""
import os
import random
import sqlite3
import sys

import torch

import agent
import configurator
import dialog
import lowbit
import pretrained
from model import DTYPES, autocast, check_device, resolve_device, resolve_dtype
from prepare_data import ATTRIBUTES, question_answer

DEFAULTS = dict(
    out_dir='out',          # the trained model (out_dir/ckpt.pt)
    init_from='',           # or a pretrained chat model: 'smollm2-135m', a .gguf file
    question=[],            # --question="..." asks it; repeat the flag to ask several at once
    questions_file='',      # one question per line
    interactive=False,      # read questions from stdin, one per line (a chat model keeps the conversation)
    num_random=3,           # with no question: this many random questions from the database
    population='',          # ... about 'train' or 'ood' people only ('' = anyone)
    data_dir='',            # '' = the data folder the model was trained on
    db='',                  # '' = data_dir's people.db
    max_new_tokens=160,     # per answer, tool answers not counted
    temperature=0.0,        # 0: greedy
    top_k=0,                # >0: sample among the k most likely tokens
    top_p=1.0,              # <1: sample among the most likely tokens holding this much probability
    seed=1337,              # seeds the random questions and the sampling
    device='auto',          # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',           # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16'
)
CHECKS = dict(population=('', 'train', 'ood'), device=check_device, dtype=DTYPES, top_p=agent.CHECKS['top_p'])


def format_dialog(text, fmt):
    """A dialog's text as labelled lines: the question, the SQL, the database's answer, the answer."""
    return '\n'.join(f'{role:>9}: {content}' for role, content in fmt.turns(text))


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


def chat(bot, sampling):
    """Questions from stdin, one per line. A chat format keeps the conversation: each question
    follows the dialog so far, and only the new turns are printed. Our own format was trained on
    single dialogs, so each question starts anew."""
    keep = bot.fmt.name != 'itl'
    print('ask a question (empty line or ctrl-d to quit)', file=sys.stderr)
    history = ''
    for line in sys.stdin:
        if not line.strip():
            break
        try:
            lane = bot.run([line.strip()], histories=[history], **sampling)[0]
        except ValueError:  # the conversation outgrew the model's context: start a new one
            print('(the conversation is longer than the model reads: starting anew)', file=sys.stderr)
            history = ''
            lane = bot.run([line.strip()], **sampling)[0]
        new_turns = bot.fmt.turns(lane.text)[len(bot.fmt.turns(history)):]
        print('\n'.join(f'{role:>9}: {content}' for role, content in new_turns) + '\n', flush=True)
        history = lane.text + bot.fmt.after_end if keep else ''


def main(argv):
    asked = [a.split('=', 1)[1] for a in argv if a.startswith('--question=')]  # repeatable
    cfg = configurator.main_parse(DEFAULTS, [a for a in argv if not a.startswith('--question=')],
                                  checks=CHECKS)
    asked = cfg.question + asked  # a config file may list some too
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        if cfg.init_from:  # a pretrained chat model: questions of your own, no database
            model, tokenizer, fmt = pretrained.load(cfg.init_from, device)
            bot, db_path = agent.Agent(model, tokenizer, dialog.get(fmt), cache_dtype=getattr(torch, dtype)), None
            low_bits = dtype == 'float32' and lowbit.keep_low_bits(model)  # a GGUF file's 4-bit weights
        else:
            low_bits = False
            model, ckpt, data_dir = agent.load_trained(cfg.out_dir, device, cfg.data_dir)
            db_path = cfg.db or os.path.join(data_dir, 'people.db')
            bot = agent.make_agent(model, ckpt['tokenizer'], db_path, ckpt['config']['dataset'], dtype,
                                   data_dir)
        if cfg.questions_file:
            with open(cfg.questions_file) as f:
                asked += [line.strip() for line in f if line.strip()]
        if low_bits and (cfg.interactive or len(asked) == 1):
            # one lane decodes from the low bits ~2x faster, and faster than drafts checked over
            # the float32 weights (36 against 29 tokens/s, SmolLM2-135M on 2 cores)
            bot.drafter = None
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}")
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                    top_p=cfg.top_p, seed=cfg.seed)
    with autocast(device, dtype):
        if cfg.interactive:
            return chat(bot, sampling)
        if not asked and not db_path:
            raise SystemExit('error: ask it something: --question="..." (or --interactive)')
        try:
            asked = asked or random_questions(db_path, cfg.num_random, cfg.seed, cfg.population)
        except (sqlite3.Error, ValueError) as e:
            raise SystemExit(f"error: {e}")
        for lane in bot.run(asked, **sampling):
            print(format_dialog(lane.text, bot.fmt) + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
