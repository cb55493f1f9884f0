"""
How a dialog is written down: the one place that knows the special tokens, the three kinds of
dialog we train on, how a prompt is opened, how a tool call ends and its answer is spliced in,
which tokens carry the loss, and where the final answer is.

prepare_data.py writes dialogs with it, tokenizers append its special tokens, agent.py opens
prompts and intercepts tool calls with it, sample.py prints dialogs turn by turn with it. A chat
format of a pretrained model (ChatML, Llama 3's headers) is another class with the same methods.
"""
import re

import numpy as np


class DialogFormat:
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
    tool_call = database  # the token that ends an assistant turn holding SQL
    tool_open, tool_close = '', assistant  # around the database's answer spliced after a call
    _split = re.compile('(' + '|'.join(re.escape(s) for s in special_tokens) + ')')

    # --- writing dialogs -----------------------------------------------------------------------
    def bio(self, sentences):
        return f"{self.assistant}{' '.join(sentences)}{self.end}"

    def qa(self, question, answer):
        return f'{self.prompt(question)}{answer}{self.end}'

    def qatool(self, question, sql, result, answer):
        return f'{self.prompt(question)}{sql}{self.tool_call}{self.tool_answer(result)}{answer}{self.end}'

    def prompt(self, question):
        """The text that opens a dialog for the model to continue as the assistant."""
        return f'{self.user}{question}{self.assistant}'

    def tool_answer(self, result):
        """What is spliced after a tool call: the database's text, then the assistant's turn."""
        return f'{self.tool_open}{result}{self.tool_close}'

    # --- reading dialogs -----------------------------------------------------------------------
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

    def final_answer(self, text):
        """The assistant's last turn, without its special tokens."""
        return text.rsplit(self.assistant, 1)[-1].split(self.end)[0]

    def loss_mask(self, tokens, special_ids):
        """True on what the assistant writes: its text and the special token ending its turn.

        tokens: int array of whole dialogs; special_ids: the ids of special_tokens, in order.
        """
        tokens = np.asarray(tokens)
        is_special = np.isin(tokens, special_ids)
        last_special = np.maximum.accumulate(np.where(is_special, np.arange(len(tokens)), -1))
        owner = np.empty(len(tokens), dtype=np.int64)  # the special token that opened this turn
        owner[0], owner[1:] = -1, last_special[:-1]
        assistant_id = special_ids[self.special_tokens.index(self.assistant)]
        return (owner >= 0) & (tokens[np.maximum(owner, 0)] == assistant_id)


class ChatML:
    """The chat format of SmolLM (and Qwen): each turn is <|im_start|>ROLE\nTEXT<|im_end|>\n.

        <|im_start|>user\nQUESTION<|im_end|>\n<|im_start|>assistant\nANSWER<|im_end|>\n

    The assistant's turn ends with <|im_end|>, the end of what it writes. For now it asks and
    answers: the tool turn (SQL, then a turn of the database's own role), the datasets written in
    it and their loss mask are the next steps of this format.
    """
    name = 'chatml'
    start, end = '<|im_start|>', '<|im_end|>'
    special_tokens = (start, end)
    tool_call = None
    _split = re.compile(r'<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|$)', re.S)

    def prompt(self, question):
        return f'{self.start}user\n{question}{self.end}\n{self.start}assistant\n'

    def qa(self, question, answer):
        return f'{self.prompt(question)}{answer}{self.end}\n'

    def turns(self, text):
        return [(role, content) for role, content in self._split.findall(text)]

    def final_answer(self, text):
        return self.turns(text)[-1][1] if self.turns(text) else ''


FORMATS = {f.name: f() for f in (DialogFormat, ChatML)}


def get(name):
    """The dialog format a dataset or checkpoint names."""
    if name not in FORMATS:
        raise ValueError(f"unknown dialog format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]
