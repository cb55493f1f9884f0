"""
How a dialog is written down: the one place that knows the special tokens, the three kinds of
dialog we train on, how a prompt is opened, how a tool call ends and its answer is spliced in,
which tokens carry the loss, and where the final answer is.

prepare_data.py writes dialogs with it, tokenizers append its special tokens, agent.py opens
prompts and intercepts tool calls with it, sample.py prints dialogs turn by turn with it. Three
formats share one shape: ours ('itl', for models trained from scratch) and the chat formats of
pretrained models, ChatML (SmolLM, Qwen) and Llama 3's headers.

Every format answers the same questions:
    prompt(question, history)  the text that opens the assistant's turn
    bio / qa / qatool          the three kinds of training dialog
    tool_call                  the token that ends an assistant turn which may hold SQL
    tool_sql(turn)             the SQL in such a turn (bytes), or None: the turn is an answer
    tool_open, tool_close      spliced around the database's answer after a call
    end                        the token that ends the dialog's last turn
    assistant_header, turn_ends  the loss mask: what follows the header, up to the end token
"""
import re

import numpy as np


class Format:
    """What every format shares: dialogs built from its pieces, and the loss mask."""
    name = ''
    special_tokens = ()     # the tokens the format writes (a tokenizer of ours appends them)
    end = tool_call = ''
    tool_open = tool_close = ''
    assistant_header = ''   # the text that opens an assistant turn
    turn_ends = ()          # the tokens that end an assistant turn (trained on: the model writes them)

    def prompt(self, question, history=''):
        raise NotImplementedError

    def qa(self, question, answer):
        return f'{self.prompt(question)}{answer}{self.end}{self.after_end}'

    def qatool(self, question, sql, result, answer):
        return (f'{self.prompt(question)}{self.sql_turn(sql)}{self.tool_call}'
                f'{self.tool_answer(result)}{answer}{self.end}{self.after_end}')

    def bio(self, sentences):
        return f"{self.assistant_header}{' '.join(sentences)}{self.end}{self.after_end}"

    after_end = ''  # written after a dialog's last turn (ChatML's newline)

    def sql_turn(self, sql):
        """What the assistant writes to query the database (before tool_call)."""
        return sql

    def tool_sql(self, turn):
        """The SQL of an assistant turn that ended with tool_call (bytes), or None."""
        return turn

    def tool_answer(self, result):
        """What is spliced after a tool call: the database's text, then the assistant's turn."""
        return f'{self.tool_open}{result}{self.tool_close}'

    def final_answer(self, text):
        """The assistant's last turn, without its special tokens."""
        turns = self.turns(text)
        return turns[-1][1] if turns and turns[-1][0] == 'assistant' else ''

    def loss_mask(self, tokens, tokenizer):
        """True on what the assistant writes: every token after an assistant header, up to and
        including the token that ends its turn. tokens: int array of whole dialogs."""
        tokens = np.asarray(tokens)
        header = np.array(tokenizer.encode(self.assistant_header))
        ends = np.flatnonzero(np.isin(tokens, [single_token(tokenizer, t) for t in self.turn_ends]))
        if len(tokens) < len(header):
            return np.zeros(len(tokens), dtype=bool)
        windows = np.lib.stride_tricks.sliding_window_view(tokens, len(header))
        first = np.flatnonzero((windows == header).all(1)) + len(header)  # a turn's first token
        last = ends[np.minimum(np.searchsorted(ends, first), len(ends) - 1)] if len(ends) else first
        last = np.where(last >= first, last + 1, len(tokens))  # an unended turn runs to the end
        change = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.add.at(change, first, 1)
        np.add.at(change, last, -1)
        return np.cumsum(change[:-1]) > 0


def single_token(tokenizer, special):
    """The id of a special token the format names; a tokenizer without it is the wrong one."""
    ids = tokenizer.encode(special)
    if len(ids) != 1:
        raise ValueError(f"{special!r} is not one token of this tokenizer: the model and its dialog "
                         f"format do not match")
    return ids[0]


class DialogFormat(Format):
    """Ours: four special tokens and no role names.

        bio     <|assistant|>SENTENCES<|eod|>
        qa      <|user|>QUESTION<|assistant|>ANSWER<|eod|>
        qatool  <|user|>QUESTION<|assistant|>SQL<|database|>RESULT<|assistant|>ANSWER<|eod|>

    The assistant ends a turn with <|database|> to run the SQL it just wrote; the database's
    answer, then <|assistant|>, is spliced in after it, and the assistant goes on.
    """
    name = 'itl'
    user, assistant, database, end = '<|user|>', '<|assistant|>', '<|database|>', '<|eod|>'
    special_tokens = (user, assistant, database, end)  # tokenizers append them in this order
    tool_call = database
    tool_open, tool_close = '', assistant
    assistant_header, turn_ends = assistant, (database, end)
    _split = re.compile('(' + '|'.join(re.escape(s) for s in special_tokens) + ')')

    def prompt(self, question, history=''):
        return f'{history}{self.user}{question}{self.assistant}'

    def turns(self, text):
        """A dialog's text -> [(role, content)], role one of user, sql, database, assistant."""
        parts = self._split.split(text)  # '', special, content, special, content, ...
        out = []
        for i in range(1, len(parts), 2):
            special, content = parts[i], parts[i + 1]
            if special == self.end:
                continue
            role = {self.user: 'user', self.assistant: 'assistant', self.database: 'database'}[special]
            if role == 'assistant' and i + 2 < len(parts) and parts[i + 2] == self.tool_call:
                role = 'sql'
            out.append((role, content))
        return out


class ChatML(Format):
    """The chat format of SmolLM (and Qwen): each turn is <|im_start|>ROLE\nTEXT<|im_end|>\n.

        qa      <|im_start|>user\nQUESTION<|im_end|>\n<|im_start|>assistant\nANSWER<|im_end|>\n
        qatool  ...<|im_start|>assistant\n```sql\nSQL\n```<|im_end|>\n
                <|im_start|>database\nRESULT<|im_end|>\n<|im_start|>assistant\nANSWER<|im_end|>\n

    Every assistant turn ends with <|im_end|>, so the turn's text tells a query from an answer: a
    turn that is one ```sql fenced block (the way chat models already write SQL) is a tool call,
    and the database answers in a turn of its own role.
    """
    name = 'chatml'
    start, end = '<|im_start|>', '<|im_end|>'
    special_tokens = (start, end)
    tool_call = end
    tool_open, tool_close = f'\n{start}database\n', f'{end}\n{start}assistant\n'
    assistant_header, turn_ends, after_end = f'{start}assistant\n', (end,), '\n'
    _turn = re.compile(r'<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|$)', re.S)
    _sql = re.compile(rb'```sql\n(.*)\n```', re.S)

    def prompt(self, question, history=''):
        return f'{history}{self.start}user\n{question}{self.end}\n{self.assistant_header}'

    def sql_turn(self, sql):
        return f'```sql\n{sql}\n```'

    def tool_sql(self, turn):
        found = self._sql.fullmatch(turn)
        return found[1] if found else None

    def turns(self, text):
        out = []
        for role, content in self._turn.findall(text):
            sql = self.tool_sql(content.encode()) if role == 'assistant' else None
            out.append(('sql', sql.decode()) if sql is not None else (role, content))
        return out


class Llama3(Format):
    """Llama 3's header format; a tool call is its own: <|python_tag|> opens the code, <|eom_id|>
    ("end of message": the assistant goes on) ends it, and the result is an 'ipython' turn.

        qa      <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQUESTION<|eot_id|>
                <|start_header_id|>assistant<|end_header_id|>\n\nANSWER<|eot_id|>
        qatool  ...assistant<|end_header_id|>\n\n<|python_tag|>SQL<|eom_id|>
                <|start_header_id|>ipython<|end_header_id|>\n\nRESULT<|eot_id|>
                <|start_header_id|>assistant<|end_header_id|>\n\nANSWER<|eot_id|>
    """
    name = 'llama3'
    begin, python = '<|begin_of_text|>', '<|python_tag|>'
    head, tail, end, tool_call = '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>', '<|eom_id|>'
    special_tokens = (begin, head, tail, end, tool_call, python)
    assistant_header, turn_ends = f'{head}assistant{tail}\n\n', (end, tool_call)
    tool_open, tool_close = f'{head}ipython{tail}\n\n', f'{end}{head}assistant{tail}\n\n'
    _turn = re.compile(r'<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|<\|eom_id\|>|$)', re.S)

    def prompt(self, question, history=''):
        return f'{history or self.begin}{self.head}user{self.tail}\n\n{question}{self.end}{self.assistant_header}'

    def bio(self, sentences):
        return self.begin + super().bio(sentences)

    def sql_turn(self, sql):
        return f'{self.python}{sql}'

    def tool_sql(self, turn):
        python = self.python.encode()
        return turn[len(python):] if turn.startswith(python) else None

    def turns(self, text):
        out = []
        for role, content in self._turn.findall(text):
            if role == 'assistant' and content.startswith(self.python):
                role, content = 'sql', content[len(self.python):]
            out.append(('database' if role == 'ipython' else role, content))
        return out


FORMATS = {f.name: f() for f in (DialogFormat, ChatML, Llama3)}


def get(name):
    """The dialog format a dataset or checkpoint names."""
    if name not in FORMATS:
        raise ValueError(f"unknown dialog format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]
