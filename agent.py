"""
Batched generation with SQL tool interception, and recall evaluation.

    python agent.py --out_dir=out/quick --split=ood --n=1000 --show=2

B dialogs advance together through the KV cache, one token per step. When a lane's assistant
turn ends with <|database|>, its SQL runs in the sandboxed SqlTool and the answer, followed by
<|assistant|>, is spliced into that lane in the same forward pass as the other lanes' next
tokens. A lane stops at <|eod|> or max_new_tokens; finished lanes drop out of the batch.
"""
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

import configurator
import tokenizer as tok
from model import GPT, GPTConfig, pick_device
from tool import SqlTool

DEFAULTS = dict(
    out_dir='out',           # the checkpoint to load (out_dir/ckpt.pt)
    data_dir='',             # dataset (questions, people.db); '' = the checkpoint's data_dir
    db='',                   # another people.db with the same schema; '' = data_dir's
    split='ood',             # 'train' (people trained on) or 'ood' (never seen)
    n=1000,                  # questions to evaluate
    batch_size=1024,         # lanes generated together
    max_new_tokens=160,      # per lane, tool answers not counted
    temperature=0.0,         # 0: greedy
    top_k=0,                 # >0: sample among the k most likely tokens
    seed=1337,
    show=0,                  # print this many full dialogs
    device='auto',
    dtype='float32',
)


@dataclass
class Lane:
    """One dialog's result: its full text and what happened in it."""
    text: str
    tool_calls: int = 0
    tool_errors: int = 0
    finished: bool = False   # reached <|eod|> (else ran out of tokens)
    generated: int = 0       # tokens the model wrote (the prompt and tool answers not counted)


def final_answer(text):
    """The assistant's last turn, without its special tokens."""
    return text.rsplit('<|assistant|>', 1)[-1].split('<|eod|>')[0]


def is_correct(answer, expected):
    """The paper's rule: the final answer holds the expected value, here as a whole word
    (so '1/7/1975' is not found inside '11/7/1975')."""
    return re.search(r'(?<![\w/])' + re.escape(expected) + r'(?![\w/])', answer) is not None


class Agent:
    def __init__(self, model, tokenizer, sql_tool=None, cache_dtype=None):
        self.model, self.tok, self.tool = model, tokenizer, sql_tool
        self.cache_dtype = cache_dtype  # None: the model's (bfloat16 on GPU halves the cache)
        self.user, self.assistant, self.database, self.eod = tokenizer.special_ids

    def _tool_answer(self, turn_ids):
        """The tokens spliced after <|database|>: the tool's text, then <|assistant|>."""
        text, ok = self.tool(self.tok.decode_bytes(turn_ids))
        return self.tok.encode(text) + [self.assistant], ok

    @torch.no_grad()
    def run(self, questions, max_new_tokens=160, temperature=0.0, top_k=0, seed=1337):
        """Answer a batch of questions -> one Lane per question, in order."""
        device, max_len = self.model.embed.weight.device, self.model.config.block_size
        prompts = [self.tok.encode(f'<|user|>{q}<|assistant|>') for q in questions]
        B = len(prompts)
        length = torch.tensor([len(p) for p in prompts], device=device)  # tokens in each lane
        if int(length.max()) >= max_len:
            raise ValueError(f"a question of {int(length.max())} tokens leaves no room in "
                             f"block_size {max_len}")
        tokens = torch.zeros(B, max_len, dtype=torch.long, device=device)  # every lane's dialog
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p)
        cache = self.model.new_cache(B, max_len, dtype=self.cache_dtype)
        logits = self.model.extend(tokens[:, :int(length.max())], cache, torch.zeros_like(length), length)
        cached = length.clone()                  # tokens of each lane already in the cache
        rows = torch.arange(B, device=device)    # the lane held in each cache row
        live = torch.ones(B, dtype=torch.bool, device=device)  # cache rows still generating
        generated = torch.zeros(B, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        turn_start = length.clone()              # where each lane's assistant turn began
        tool_calls, tool_errors = [0] * B, [0] * B
        generator = torch.Generator(device=device).manual_seed(seed)
        while True:
            live_rows = live.nonzero().squeeze(1)
            lane = rows[live_rows]
            new = self._sample(logits[live_rows], temperature, top_k, generator)
            tokens[lane, length[lane]] = new
            length[lane] += 1
            generated[lane] += 1
            finished[lane[new == self.eod]] = True
            stop = (new == self.eod) | (generated[lane] >= max_new_tokens) | (length[lane] >= max_len)
            calls = (new == self.database) & ~stop if self.tool else torch.zeros_like(stop)
            call_rows = calls.nonzero().squeeze(1)
            if len(call_rows):
                stop[call_rows] = self._call_tool(lane[call_rows], tokens, length, turn_start,
                                                  tool_calls, tool_errors)
            live[live_rows[stop]] = False
            if not live.any():
                break
            if 4 * int((~live).sum()) > len(live):  # mostly finished rows: shrink the cache
                cache.k, cache.v = [k[live] for k in cache.k], [v[live] for v in cache.v]
                rows, live = rows[live], live[live]
            logits = self._advance(tokens, length, cached, cache, rows, live)
        return [Lane(text=self.tok.decode(tokens[b, :length[b]].tolist()), tool_calls=tool_calls[b],
                     tool_errors=tool_errors[b], finished=bool(finished[b]), generated=int(generated[b]))
                for b in range(B)]

    def _call_tool(self, lanes, tokens, length, turn_start, tool_calls, tool_errors):
        """Run the SQL each lane just wrote and write the database's answer after it, in place.

        A loop over tool calls, not tokens, on plain Python values. -> bool per lane: no room
        was left for the answer, so the lane ends there.
        """
        max_len = tokens.size(1)
        no_room = torch.zeros(len(lanes), dtype=torch.bool, device=lanes.device)
        dialogs = tokens[lanes].tolist()
        starts, ends = turn_start[lanes].tolist(), length[lanes].tolist()
        for i, (b, dialog, start, end) in enumerate(zip(lanes.tolist(), dialogs, starts, ends)):
            answer, ok = self._tool_answer(dialog[start:end - 1])  # the SQL, less <|database|>
            tool_calls[b] += 1
            tool_errors[b] += not ok
            if end + len(answer) >= max_len:
                no_room[i] = True
                continue
            tokens[b, end:end + len(answer)] = torch.tensor(answer, device=tokens.device)
            length[b] = turn_start[b] = end + len(answer)
        return no_room

    def _advance(self, tokens, length, cached, cache, rows, live):
        """Feed the cache what the lanes wrote since the last step -> next-token logits per row.

        Every live lane's sampled token goes in one step (dead rows add nothing); then the tool
        answers, in a second step over just the lanes that got one.
        """
        max_len = tokens.size(1)
        n_new = live.long()
        step = tokens[rows, cached[rows].clamp(max=max_len - 1)][:, None]
        logits = self.model.extend(step, cache, cached[rows], n_new)
        cached[rows] += n_new
        spliced = (live & (length[rows] > cached[rows])).nonzero().squeeze(1)
        if len(spliced):
            lane = rows[spliced]
            n_new = length[lane] - cached[lane]
            offsets = cached[lane, None] + torch.arange(int(n_new.max()), device=tokens.device)
            step = tokens[lane[:, None], offsets.clamp(max=max_len - 1)]
            logits[spliced] = self.model.extend(step, cache, cached[lane], n_new, rows=spliced)
            cached[lane] += n_new
        return logits

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float('-inf'))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Loading a trained model, and evaluation

def load_checkpoint(out_dir, device):
    """-> (model in eval mode, checkpoint dict). Clear errors for a missing or foreign file."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with python train.py "
                                f"config/quick.py --out_dir={out_dir}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
    except Exception as e:  # a truncated or foreign file: say which and why, not a traceback
        raise ValueError(f"{path} is not a usable nano-itl checkpoint: {type(e).__name__}: {e}") from None
    return model.to(device).eval(), ckpt


def read_questions(data_dir, split, n):
    path = os.path.join(data_dir, f'questions_{split}.jsonl')
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}: run python prepare_data.py --out_dir={data_dir}")
    questions = []
    with open(path) as f:
        for line in f:
            questions.append(json.loads(line))
            if len(questions) == n:
                break
    return questions


def make_agent(model, tokenizer_meta, db_path, dataset, dtype='float32'):
    """In-tool models get the SQL tool; in-weight ones answer from memory, with no tool turn."""
    tokenizer = tok.from_meta(tokenizer_meta)
    sql_tool = SqlTool(db_path) if 'qatool' in dataset else None
    return Agent(model, tokenizer, sql_tool, cache_dtype=getattr(torch, dtype))


def evaluate(agent, questions, batch_size=1024, **sampling):
    """Run the questions in batches -> (metrics dict, lanes)."""
    t0, lanes = time.time(), []
    for i in range(0, len(questions), batch_size):
        lanes += agent.run([q['question'] for q in questions[i:i + batch_size]], **sampling)
    elapsed = time.time() - t0
    correct = [is_correct(final_answer(lane.text), q['answer']) for lane, q in zip(lanes, questions)]
    new_tokens = sum(lane.generated for lane in lanes)
    metrics = {'accuracy': sum(correct) / max(1, len(correct)), 'n': len(questions),
               'prompts_per_s': round(len(questions) / elapsed, 1),
               'tokens_per_s': round(new_tokens / elapsed, 1),
               'tool_calls': sum(l.tool_calls for l in lanes),
               'tool_errors': sum(l.tool_errors for l in lanes)}
    return metrics, lanes


def recall_metrics(model, data_dir, meta, dataset, n, device):
    """train.py's periodic recall: accuracy on n questions about trained and about OOD people."""
    agent = make_agent(model, meta['tokenizer'], os.path.join(data_dir, 'people.db'), dataset)
    out = {}
    for split, key in (('train', 'recall'), ('ood', 'recall_ood')):
        out[key] = evaluate(agent, read_questions(data_dir, split, n))[0]['accuracy']
    out['recall_min'] = min(out['recall'], out['recall_ood'])
    return out


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv)
    device = pick_device(cfg.device)
    try:
        model, ckpt = load_checkpoint(cfg.out_dir, device)
        data_dir = cfg.data_dir or ckpt['config']['data_dir']
        agent = make_agent(model, ckpt['tokenizer']['tokenizer'], cfg.db or os.path.join(data_dir, 'people.db'),
                           ckpt['config']['dataset'], cfg.dtype)
        questions = read_questions(data_dir, cfg.split, cfg.n)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    with torch.autocast(device.split(':')[0], dtype=torch.bfloat16, enabled=cfg.dtype == 'bfloat16'):
        metrics, lanes = evaluate(agent, questions, cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed)
    for lane, q in list(zip(lanes, questions))[:cfg.show]:
        verdict = 'right' if is_correct(final_answer(lane.text), q['answer']) else 'wrong'
        print(f"--- {verdict} (expected {q['answer']})\n{lane.text}", file=sys.stderr)
    print(json.dumps({'split': cfg.split, **metrics}))


if __name__ == '__main__':
    main(sys.argv[1:])
