"""
Batched generation with SQL tool interception, and recall evaluation.

    python agent.py --out_dir=out/quick --split=ood --n=1000 --show=2
    python agent.py --out_dir=out/quick --split=ood --records=out/quick/records_ood.jsonl

B dialogs advance together through the KV cache, one token per step. When a lane's assistant
turn ends with a tool call (<|database|> in our format; in a chat format the end of a turn that
is a ```sql block, or Llama 3's <|eom_id|>: dialog.py), its SQL runs in the sandboxed SqlTool
and the answer, then the assistant's next turn, is spliced into that lane in the same step as
the other lanes' next tokens. A lane stops at the end of its dialog or at max_new_tokens; once
more than a quarter of the lanes are done, the finished ones leave the batch.
"""
import collections
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import configurator
import cpu_kernels
import dialog
import tokenizer as tok
from model import (DTYPES, GPT, CheckpointError, autocast, check_device, keep_freed_memory, resolve_device,
                   resolve_dtype)
from tool import SqlTool

DEFAULTS = dict(
    out_dir='out',           # the trained model (out_dir/ckpt.pt)
    data_dir='',             # questions and people.db; '' = the checkpoint's data folder
    db='',                   # another people.db with the same schema; '' = data_dir's
    split='ood',             # 'train' (people trained on) or 'ood' (never seen)
    n=1000,                  # questions to evaluate, spread over people (read_questions)
    batch_size=1024,         # lanes generated together
    max_new_tokens=160,      # per lane, tool answers not counted
    temperature=0.0,         # 0: greedy
    top_k=0,                 # >0: sample among the k most likely tokens
    top_p=1.0,               # <1: sample among the most likely tokens holding this much probability
    seed=1337,               # seeds the sampling
    show=0,                  # print this many full dialogs (stderr)
    records='',              # write one JSON line per question to this file
    device='auto',           # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',            # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16'
    draft=8,                 # greedy: tokens guessed ahead a step from the dialog so far, all
                             # checked in one pass (the same answers, fewer steps); 0: none
)
TOOL_ROOM = 1024  # tokens a lane keeps for the database's answers
CHECKS = dict(split=('train', 'ood'), device=check_device, dtype=DTYPES,
              top_p=lambda p: None if 0 < p <= 1 else 'a probability mass in (0, 1]')


@dataclass
class Lane:
    """One dialog's result: its full text and what happened in it."""
    text: str
    tool_calls: int = 0
    tool_errors: int = 0
    finished: bool = False   # reached the end of the dialog (else ran out of tokens)
    generated: int = 0       # tokens the model wrote (the prompt and tool answers not counted)


def is_correct(answer, expected):
    """The paper's rule: the final answer holds the expected value, here as a whole word
    (so '1/7/1975' is not found inside '11/7/1975'): no letter, digit, '_' or '/' on either side.
    (A regular expression built for each value took ~30 ms a batch of 1024: ~5% of it.)"""
    glued = lambda c: c != '' and (c.isalnum() or c in '_/')  # c: one character, or '' at an end
    at = answer.find(expected)
    while at >= 0:
        if not (glued(answer[at - 1:at]) or glued(answer[at + len(expected):at + len(expected) + 1])):
            return True
        at = answer.find(expected, at + 1)
    return False


def ngram_keys(tokens, n, shorter=None):
    """One int64 per run of n tokens (ids below 2**17, n <= 3): keys[..., i] for tokens[..., i:i+n].
    shorter: ngram_keys(tokens, n - 1) where already at hand, extended by one token, not rebuilt."""
    first = 1 if shorter is None else n - 1  # the tokens already in the keys
    keys = tokens[..., :tokens.size(-1) - n + 1] if shorter is None else shorter[..., :-1]
    for i in range(first, n):
        keys = (keys << 17) | tokens[..., i:tokens.size(-1) - n + 1 + i]
    return keys


class Drafter:
    """Prompt-lookup drafts, batched: a lane's last n tokens are looked up in its own dialog
    (their latest earlier occurrence), else in a few example dialogs, else its last n - 1 in its
    own dialog, and the k tokens that followed them there are the draft. What the model writes
    is mostly copied: the name in the SQL is the question's, the value in the answer the
    database's, the SQL itself and the sentence around the value are the examples'. The shorter
    lookup catches a copy in its first tokens: "= 'An" after a question about Anton (at 1024
    lanes: 39 -> 33 steps, 11% fewer lanes a step, 1% more tokens checked). A draft stops before a
    stop token, so the agent still sees every end of turn and tool call one token at a time."""

    def __init__(self, examples=(), n=3, k=8, stop_ids=(), device='cpu'):
        self.n, self.k = n, k
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        follow = {}  # an example n-gram's key -> the tokens after it (the last example's wins)
        for ids in examples:
            ids = torch.tensor(ids, dtype=torch.long)
            for i, key in enumerate(ngram_keys(ids, n).tolist()[:-1]):
                follow[key] = ids[i + n:i + n + k]
        self.keys = torch.tensor(sorted(follow), dtype=torch.long)
        self.drafts = torch.zeros(len(follow), k, dtype=torch.long)
        self.counts = torch.zeros(len(follow), dtype=torch.long)
        for row, key in enumerate(sorted(follow)):
            self.drafts[row, :len(follow[key])] = follow[key]
            self.counts[row] = len(follow[key])
        self.keys, self.drafts, self.counts = (t.to(device) for t in (self.keys, self.drafts, self.counts))

    def __call__(self, tokens, length, room):
        """tokens (R, L) lanes' dialogs, length (R,), room (R,) the most tokens a lane may take
        -> drafts (R, k) and how many of each are real (R,)."""
        n, k, device = self.n, self.k, tokens.device
        tokens = tokens[:, :int(length.max())]
        shorter = ngram_keys(tokens, n - 1) if n > 1 else None       # (R, L - n + 2)
        keys = ngram_keys(tokens, n, shorter)                          # (R, L - n + 1)
        draft, count, suffix = self.lookup(tokens, length, keys, n)
        if len(self.keys):  # no earlier occurrence: the examples'
            row = torch.searchsorted(self.keys, suffix).clamp(max=len(self.keys) - 1)
            known = (self.keys[row] == suffix) & (count == 0)
            draft = torch.where(known[:, None], self.drafts[row], draft)
            count = torch.where(known, self.counts[row], count)
        if n > 1:  # neither: the last n - 1 tokens in the lane's own dialog
            short_draft, short_count, _ = self.lookup(tokens, length, shorter, n - 1)
            draft = torch.where((count == 0)[:, None], short_draft, draft)
            count = torch.where(count == 0, short_count, count)
        count = torch.minimum(count, room.clamp(min=0))
        # up to the first stop token: it comes from the model, one token a step
        stops = torch.isin(draft, self.stop_ids) | (torch.arange(k, device=device) >= count[:, None])
        return draft, stops.long().argmax(1).where(stops.any(1), count)

    def lookup(self, tokens, length, keys, n):
        """keys (R, L - n + 1) of each lane's n-grams -> (the k tokens after the latest earlier
        occurrence of its last n-gram (R, k), how many of them are real (R,), the last n-gram's
        key (R,))."""
        last = (length - n).clamp(min=0)                               # where each lane's last n-gram starts
        suffix = keys.gather(1, last[:, None])                         # (R, 1)
        starts = torch.arange(keys.size(1), device=tokens.device)
        seen = torch.where((keys == suffix) & (starts < last[:, None]), starts, -1).max(1).values
        at = (seen + n)[:, None] + torch.arange(self.k, device=tokens.device)
        draft = tokens.gather(1, at.clamp(max=tokens.size(1) - 1))
        count = torch.where(seen >= 0, (length - seen - n).clamp(max=self.k), 0) * (length >= n)
        return draft, count, suffix.squeeze(1)


class Agent:
    def __init__(self, model, tokenizer, fmt, sql_tool=None, cache_dtype=None, examples=(), draft=8):
        """examples: a few dialogs in the model's format, the drafts' source besides each lane's
        own text; draft: the most tokens guessed ahead per step under greedy decoding (0: none)."""
        self.model, self.tok, self.fmt, self.tool = model, tokenizer, fmt, sql_tool
        self.cache_dtype = cache_dtype  # None: the model's (bfloat16 on GPU halves the cache)
        self.end_id = dialog.single_token(tokenizer, fmt.end)
        # the token a tool call ends with (ChatML's is end_id); a model with no tool needs none
        self.call_id = dialog.single_token(tokenizer, fmt.tool_call) if sql_tool else None
        stop_ids = [self.end_id] + ([self.call_id] if sql_tool else [])
        # what every tool answer opens and closes with, tokenized once
        self.tool_open, self.tool_close = tokenizer.encode(fmt.tool_open), tokenizer.encode(fmt.tool_close)
        self.drafter = Drafter([tokenizer.encode(e) for e in examples], k=draft, stop_ids=stop_ids,
                               device=model.embed.weight.device) if draft else None

    def _tool_answer(self, turn_ids):
        """An assistant turn that ended with a tool call -> (the tokens spliced after it: the
        database's text, then the assistant's turn; whether the SQL ran), or None when the turn
        holds no SQL (a ChatML answer). The database's text is data: a special token spelt out
        in it stays plain text."""
        sql = self.fmt.tool_sql(self.tok.decode_bytes(turn_ids))
        if sql is None:
            return None
        result, ok = self.tool(sql)
        return self.tool_open + self.tok.encode_ordinary(result) + self.tool_close, ok

    def encode_prompts(self, questions, histories=None):
        """The token ids that open each question's assistant turn, after its history."""
        histories = histories or [''] * len(questions)
        return [self.tok.encode(self.fmt.prompt(q, h)) for q, h in zip(questions, histories)]

    @torch.no_grad()
    def run(self, questions, max_new_tokens=160, temperature=0.0, top_k=0, top_p=1.0, seed=1337,
            on_step=None, histories=None):
        """Answer a batch of questions -> one Lane per question, in order. on_step(n) is called
        after every step with the number of lanes finished so far. histories: each lane's
        conversation so far (a Lane's text), which its question follows up."""
        model = self.model
        device = model.embed.weight.device
        prompts = self.encode_prompts(questions, histories)
        B = len(prompts)
        # a lane's tokens: its prompt, what it writes, and the tool's answers (each at most the
        # SqlTool's 512 bytes): far less than a pretrained model's block_size of thousands
        room = max(map(len, prompts)) + max_new_tokens + (TOOL_ROOM if self.tool else 0)
        max_len = min(model.config.block_size, room)
        length = torch.tensor([len(p) for p in prompts], device=device)  # tokens in each lane
        if int(length.max()) >= max_len:
            raise ValueError(f"a question of {int(length.max())} tokens leaves no room in "
                             f"block_size {max_len}")
        tokens = torch.zeros(B, max_len, dtype=torch.long, device=device)  # every lane's dialog
        width = int(length.max())
        tokens[:, :width] = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
        model.setup_cache(B, max_len, dtype=self.cache_dtype)
        logits = model.prefill(tokens[:, :width], length)
        rows = torch.arange(B, device=device)    # the lane held in each cache row
        live = torch.ones(B, dtype=torch.bool, device=device)  # cache rows still generating
        generated = torch.zeros(B, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        turn_start = length.clone()              # where each lane's assistant turn began
        tool_calls, tool_errors = [0] * B, [0] * B
        generator = torch.Generator(device=device).manual_seed(seed)
        n_done = 0
        while True:
            live_rows = live.nonzero().squeeze(1)
            lane = rows[live_rows]
            new = self._sample(logits[live_rows], temperature, top_k, top_p, generator)
            tokens[lane, length[lane]] = new
            length[lane] += 1
            generated[lane] += 1
            ended = new == self.end_id
            out_of_room = (generated[lane] >= max_new_tokens) | (length[lane] >= max_len)
            call_rows = ((new == self.call_id) & ~out_of_room).nonzero().squeeze(1) if self.tool else []
            if len(call_rows):
                called, no_room = self._call_tool(lane[call_rows], tokens, length, turn_start,
                                                  tool_calls, tool_errors)
                ended[call_rows[called]] = False  # a ChatML turn of SQL ends like an answer
                out_of_room[call_rows] |= no_room
            finished[lane[ended]] = True
            stop = ended | out_of_room
            live[live_rows[stop]] = False
            n_done += int(stop.sum())
            if on_step:
                on_step(n_done)
            if n_done == B:
                break
            if 4 * int((~live).sum()) > len(live):  # mostly finished rows: shrink the cache
                model.keep_lanes(live)
                rows, live = rows[live], live[live]
            if self.drafter and temperature == 0:
                logits = self._speculate(tokens, length, generated, rows, live, max_new_tokens)
            else:
                logits = self._advance(tokens, length, rows, live)
        dialogs, lengths = tokens[:, :int(length.max())].tolist(), length.tolist()
        finished, generated = finished.tolist(), generated.tolist()
        return [Lane(text=self.tok.decode(dialogs[b][:lengths[b]]), tool_calls=tool_calls[b],
                     tool_errors=tool_errors[b], finished=finished[b], generated=generated[b])
                for b in range(B)]

    def _call_tool(self, lanes, tokens, length, turn_start, tool_calls, tool_errors):
        """Run the SQL each lane just wrote and write the database's answer after it, in place.

        A loop over tool calls, not tokens, on plain Python values. -> (bool per lane: its turn
        was a tool call; bool per lane: no room was left for the answer, so the lane ends there).
        """
        max_len = tokens.size(1)
        called, no_room = [False] * len(lanes), [False] * len(lanes)
        starts, ends = turn_start[lanes].tolist(), length[lanes].tolist()
        dialogs = tokens[lanes, :max(ends)].tolist()
        written = []  # (lane, where its answer starts, the answer's tokens)
        for i, (b, dialog_ids, start, end) in enumerate(zip(lanes.tolist(), dialogs, starts, ends)):
            spliced = self._tool_answer(dialog_ids[start:end - 1])  # the turn, less the call token
            if spliced is None:
                continue
            answer, ok = spliced
            called[i] = True
            tool_calls[b] += 1
            tool_errors[b] += not ok
            if end + len(answer) >= max_len:
                no_room[i] = True
                continue
            written.append((b, end, answer))
        if written:  # every answer in one write
            as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=tokens.device)
            lane_of = as_tensor([b for b, _, answer in written for _ in answer])
            position = as_tensor([end + i for _, end, answer in written for i in range(len(answer))])
            tokens[lane_of, position] = as_tensor([t for _, _, answer in written for t in answer])
            answered = as_tensor([b for b, _, _ in written])
            length[answered] = turn_start[answered] = as_tensor([end + len(answer) for _, end, answer in written])
        as_mask = lambda flags: torch.tensor(flags, dtype=torch.bool, device=lanes.device)
        return as_mask(called), as_mask(no_room)

    def _advance(self, tokens, length, rows, live):
        """Feed the cache what the lanes wrote since the last step -> next-token logits per row.

        Every live lane's sampled token goes in one step (finished rows add nothing); then the
        tool answers, in a second step over just the rows that got one.
        """
        model, max_len = self.model, tokens.size(1)
        step = tokens[rows, model.cache_lengths.clamp(max=max_len - 1)][:, None]
        logits = model.decode(step, live.long())
        return self._splice(tokens, length, rows, live, logits)

    def _speculate(self, tokens, length, generated, rows, live, max_new_tokens):
        """_advance with drafts (greedy decoding): each lane's sampled token goes in followed by
        the Drafter's guess of what comes next, all checked in the same forward pass; a lane
        keeps the guessed tokens up to the first the model would not have written itself, so the
        dialog is the one a token a step would write."""
        model, max_len = self.model, tokens.size(1)
        cached = model.cache_lengths
        plain = live & (length[rows] == cached + 1)  # wrote one token, no tool answer to splice
        room = torch.minimum(max_new_tokens - 1 - generated[rows], max_len - 1 - length[rows])
        lanes_so_far = tokens[:, :int(length[rows].max())][rows]  # what the drafts are looked up in
        draft, n_draft = self.drafter(lanes_so_far, length[rows], torch.where(plain, room, 0))
        width = int(n_draft.max())
        draft = draft[:, :width]
        step = torch.cat([tokens[rows, cached.clamp(max=max_len - 1)][:, None], draft], 1)
        n_new = live.long() + n_draft
        logits = model.decode(step, n_new, every=True)  # (N, V): after each token fed, lane by lane
        first = (n_new.cumsum(0) - n_new).clamp(max=len(logits) - 1)  # a lane's first row of them
        ahead = torch.arange(width, device=tokens.device)
        guessed = cpu_kernels.argmax(logits)[(first[:, None] + ahead).clamp(max=len(logits) - 1)]  # (R, width)
        agree = (guessed == draft) & (ahead < n_draft[:, None])
        kept = agree.long().cumprod(1).sum(1)                         # (R,) drafted tokens kept
        model.cache_lengths -= n_draft - kept                         # the others leave the cache
        keep = ahead < kept[:, None]
        at = length[rows][:, None] + ahead
        tokens[rows[:, None].expand(-1, width)[keep], at[keep]] = draft[keep]
        length[rows] += kept
        generated[rows] += kept
        logits = logits[(first + kept).clamp(max=len(logits) - 1)]  # (finished rows': unused)
        return self._splice(tokens, length, rows, live, logits)

    def _splice(self, tokens, length, rows, live, logits):
        """Feed the tool answers waiting in some lanes, in a step over just those rows."""
        model, max_len = self.model, tokens.size(1)
        spliced = (live & (length[rows] > model.cache_lengths)).nonzero().squeeze(1)
        if len(spliced):
            lane, cached = rows[spliced], model.cache_lengths[spliced]
            n_new = length[lane] - cached
            offsets = cached[:, None] + torch.arange(int(n_new.max()), device=tokens.device)
            step = tokens[lane[:, None], offsets.clamp(max=max_len - 1)]
            logits[spliced] = model.decode(step, n_new, rows=spliced)
        return logits

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, generator):
        if temperature == 0:
            return cpu_kernels.argmax(logits)
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float('-inf'))
        if top_p < 1.0:  # the nucleus: the most likely tokens until their mass reaches top_p
            ordered, order = logits.sort(-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs >= top_p
            logits = logits.scatter(-1, order, ordered.masked_fill(outside, float('-inf')))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Loading a trained model, and evaluation

def checkpoint_data_dir(ckpt, out_dir):
    """The data folder a checkpoint was trained on: next to out_dir as it was when saved (so a
    copied or moved pair of folders still works), else the path its config names."""
    candidates = [os.path.normpath(os.path.join(out_dir, ckpt['data_dir']))] if 'data_dir' in ckpt else []
    candidates.append(ckpt['config']['data_dir'])
    for path in candidates:
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"the data folder {out_dir} was trained on is not at "
                            f"{' nor '.join(candidates)}: pass --data_dir=FOLDER")


def load_trained(out_dir, device, data_dir=''):
    """-> (model in eval mode, checkpoint, data folder): what agent.py, sample.py and the
    benches start from."""
    model, ckpt = GPT.from_checkpoint(out_dir, device)
    return model, ckpt, data_dir or checkpoint_data_dir(ckpt, out_dir)


def tokenizer_meta(meta):
    """What a checkpoint keeps of its dataset's meta.json: the tokenizer itself, its special
    ids, the dialog format."""
    return {'tokenizer': meta['tokenizer'], 'special_tokens': meta['special_tokens'],
            'format': meta.get('format', 'itl')}


def make_agent(model, tokenizer_info, db_path, dataset, dtype='float32', data_dir='', draft=8):
    """In-tool models get the SQL tool; in-weight ones answer from memory, with no tool turn.
    tokenizer_info: tokenizer_meta() of the model's data (a checkpoint's 'tokenizer');
    data_dir: the data it was trained on, whose first dialogs the drafts draw on."""
    tokenizer = tok.from_meta(tokenizer_info['tokenizer'])
    fmt = dialog.get(tokenizer_info.get('format', 'itl'))
    sql_tool = SqlTool(db_path) if 'qatool' in dataset else None
    examples = example_dialogs(data_dir, dataset) if data_dir else ()
    return Agent(model, tokenizer, fmt, sql_tool, cache_dtype=getattr(torch, dtype), examples=examples,
                 draft=draft)


def example_dialogs(data_dir, dataset, n=16):
    """The first n training dialogs of each dataset a model was trained on ('qatool',
    'bio:1,qa:3'): what its answers look like."""
    texts = []
    for name in (part.split(':')[0] for part in dataset.split(',')):
        path = os.path.join(data_dir, f'{name}_train.jsonl')
        if os.path.exists(path):
            with open(path) as f:
                texts += [json.loads(line)['text'] for line, _ in zip(f, range(n))]
    return texts


def read_questions(data_dir, split, n):
    """n questions of a split, spread over as many people as there are: each person is asked one
    question before anyone is asked a second. The first n lines of the file would be n / 4
    people, all four facts each, and recall over a few people swings with one hard name. The
    sample is the same every time (seed 0), in the file's order."""
    path = os.path.join(data_dir, f'questions_{split}.jsonl')
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}: run python prepare_data.py --out_dir={data_dir}")
    with open(path) as f:
        questions = [json.loads(line) for line in f]
    if n >= len(questions):
        return questions
    order = list(range(len(questions)))
    random.Random(0).shuffle(order)
    asked = collections.Counter()  # questions taken so far per person, in the shuffled order
    rounds = []
    for i in order:
        rounds.append((asked[questions[i]['name']], len(rounds), i))
        asked[questions[i]['name']] += 1
    return [questions[i] for i in sorted(i for _, _, i in sorted(rounds)[:n])]


def wilson_interval(k, n, z=1.96):
    """95% interval of a proportion k / n (Wilson's score interval: sound near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Progress:
    """A line on stderr every few seconds of a long job: done, rate, time left."""

    def __init__(self, total, what, every_s=3.0):
        self.total, self.what, self.every_s = total, what, every_s
        self.t0 = self.last = time.time()

    def update(self, done):
        now = time.time()
        if now - self.last >= self.every_s and done:
            rate = done / (now - self.t0)
            print(f"{self.what} {done:,}/{self.total:,} | {rate:,.0f}/s | "
                  f"eta {(self.total - done) / rate:.0f}s", file=sys.stderr, flush=True)
            self.last = now


def record(question, lane, fmt):
    """One question's evaluation record: what was asked and expected, what the model did."""
    turns = fmt.turns(lane.text)
    answer = fmt.final_answer(lane.text)
    return {'question': question['question'], 'expected': question['answer'],
            'sql': [c for role, c in turns if role == 'sql'],
            'database': [c for role, c in turns if role == 'database'],
            'answer': answer, 'correct': is_correct(answer, question['answer']),
            'tool_calls': lane.tool_calls, 'tool_errors': lane.tool_errors, 'finished': lane.finished}


def evaluate(agent, questions, batch_size=1024, records='', **sampling):
    """Run the questions in batches -> (metrics dict, lanes); records: a JSONL file to write."""
    t0, lanes, progress = time.time(), [], Progress(len(questions), 'questions')
    for i in range(0, len(questions), batch_size):
        lanes += agent.run([q['question'] for q in questions[i:i + batch_size]],
                           on_step=lambda done: progress.update(i + done), **sampling)
    elapsed = time.time() - t0
    rows = [record(q, lane, agent.fmt) for q, lane in zip(questions, lanes)]
    if records:
        with open(records + '.tmp', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
        os.replace(records + '.tmp', records)
    right = sum(r['correct'] for r in rows)
    low, high = wilson_interval(right, len(rows))
    metrics = {'accuracy': right / max(1, len(rows)), 'accuracy_95': [round(low, 4), round(high, 4)],
               'n': len(questions), 'prompts_per_s': round(len(questions) / elapsed, 1),
               'tokens_per_s': round(sum(lane.generated for lane in lanes) / elapsed, 1),
               'tool_calls': sum(lane.tool_calls for lane in lanes),
               'tool_errors': sum(lane.tool_errors for lane in lanes)}
    return metrics, lanes


def recall_metrics(model, data_dir, meta, dataset, n):
    """train.py's periodic recall: accuracy on n questions about trained and about OOD people."""
    bot = make_agent(model, tokenizer_meta(meta), os.path.join(data_dir, 'people.db'), dataset,
                     data_dir=data_dir)
    out = {}
    for split, key in (('train', 'recall'), ('ood', 'recall_ood')):
        out[key] = evaluate(bot, read_questions(data_dir, split, n))[0]['accuracy']
    out['recall_min'] = min(out['recall'], out['recall_ood'])
    return out


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks=CHECKS)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device == 'cpu':
        keep_freed_memory()
    try:
        model, ckpt, data_dir = load_trained(cfg.out_dir, device, cfg.data_dir)
        bot = make_agent(model, ckpt['tokenizer'], cfg.db or os.path.join(data_dir, 'people.db'),
                         ckpt['config']['dataset'], dtype, data_dir, cfg.draft)
        questions = read_questions(data_dir, cfg.split, cfg.n)
    except (FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    with autocast(device, dtype):
        metrics, lanes = evaluate(bot, questions, cfg.batch_size, cfg.records,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
    for lane, q in list(zip(lanes, questions))[:cfg.show]:
        verdict = 'right' if is_correct(bot.fmt.final_answer(lane.text), q['answer']) else 'wrong'
        print(f"--- {verdict} (expected {q['answer']})\n{lane.text}", file=sys.stderr)
    print(json.dumps({'split': cfg.split, **metrics}))


if __name__ == '__main__':
    main(sys.argv[1:])
