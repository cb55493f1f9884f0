"""
Tokenizers: bytes (the default, vocab 260), any tiktoken encoding, or a byte-level BPE learned on
our own text and saved as a .tiktoken file, so no network is ever needed.

Every tokenizer appends the dialog format's special tokens (dialog.py) after its base vocabulary,
in that order. Dialog text spells them out literally: '<|user|>When was Ada Smith born?<|assistant|>'.
describe() holds the whole tokenizer (a BPE's merges included) as JSON, so a dataset or a
checkpoint rebuilds it with from_meta() wherever it is moved, reading no file.
"""
import base64
import collections
import os
import re

import numpy as np

import dialog

SPECIALS = dialog.DialogFormat.special_tokens  # appended after the base vocabulary, in this order

# Pre-tokenization for our BPE (words, numbers, punctuation runs, whitespace), ASCII classes so
# Python's re and tiktoken's Rust regex split text the same way.
BPE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
_SPECIAL_RE = re.compile('|'.join(re.escape(s) for s in SPECIALS))


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; the special tokens are 256-259."""
    vocab_size = 260
    special_ids = tuple(range(256, 260))

    # Each special token is swapped for a control byte the data never holds, so a whole chunk
    # of text is tokenized by one encode() and one numpy remap instead of a loop over tokens.
    _PLACEHOLDERS = {s: chr(1 + i) for i, s in enumerate(SPECIALS)}
    _MAPPED = re.compile('|'.join([re.escape(s) for s in SPECIALS] + ['[\x01-\x04]']))

    def encode_concat(self, texts):
        """list of dialog texts -> one uint16 array of their tokens, concatenated."""
        text = ''.join(texts)
        for special, placeholder in self._PLACEHOLDERS.items():
            text = text.replace(special, placeholder)
        tokens = np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.uint16)
        is_special = (tokens >= 1) & (tokens <= 4)
        tokens[is_special] += 255  # control byte 1..4 -> special id 256..259
        return tokens

    def encode(self, text):
        if not self._MAPPED.search(text):  # plain bytes (a tool's answer): no array needed
            return list(text.encode('utf-8'))
        return self.encode_concat([text]).tolist()

    def encode_dialogs(self, texts):
        """-> (every dialog's tokens, concatenated; where each dialog starts). Ours end with <|eod|>."""
        tokens = self.encode_concat(texts)
        ends = np.flatnonzero(tokens == self.special_ids[-1]) + 1
        return tokens, np.concatenate([[0], ends[:-1]])

    def encode_ordinary(self, text):
        """Text that is not ours (a database's answer): special tokens in it stay plain bytes."""
        return list(text.encode('utf-8'))

    def decode(self, ids):
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode('utf-8', errors='replace'))
            out.append(SPECIALS[i - 256])
            pending = bytearray()
        out.append(pending.decode('utf-8', errors='replace'))
        return ''.join(out)

    def decode_bytes(self, ids):
        """Raw bytes of non-special tokens (the SQL tool gets the model's bytes as written)."""
        return bytes(ids) if max(ids, default=0) < 256 else bytes(i for i in ids if i < 256)

    def describe(self):
        return {'kind': 'byte', 'vocab_size': self.vocab_size}


class TiktokenTokenizer:
    """A BPE run by tiktoken: {token bytes: rank}, a split pattern and the encoding's own special
    tokens (gpt2's <|endoftext|>, a chat model's <|im_start|>), then `appended` after all of them:
    our dialog format's, or none for a pretrained model that has its own."""

    def __init__(self, name, ranks, pattern, base_specials=None, appended=SPECIALS):
        import tiktoken
        self.name, self.ranks, self.pattern = name, ranks, pattern
        self.base_specials, self.appended = dict(base_specials or {}), tuple(appended)
        n_base = 1 + max([*ranks.values(), *self.base_specials.values()])
        specials = {s: n_base + i for i, s in enumerate(self.appended)}
        self.enc = tiktoken.Encoding(name=f'{name}+{len(specials)}', pat_str=pattern,
                                     mergeable_ranks=ranks,
                                     special_tokens={**self.base_specials, **specials})
        self.special_ids = tuple(specials.values())
        self.vocab_size = n_base + len(specials)

    def encode_dialogs(self, texts):
        """-> (every dialog's tokens, concatenated; where each dialog starts)."""
        ids = self.enc.encode_batch(texts, allowed_special='all')
        dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        tokens = np.fromiter((t for dialog_ids in ids for t in dialog_ids), dtype=dtype)
        return tokens, np.cumsum([0] + [len(d) for d in ids[:-1]], dtype=np.int64)

    def encode(self, text):
        """Text we wrote: a special token spelt out in it is that token."""
        return self.enc.encode(text, allowed_special='all')

    def encode_ordinary(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids), errors='replace')

    def decode_bytes(self, ids):
        return self.enc.decode_bytes([i for i in ids if i not in self.special_ids])

    def describe(self):  # the merges last, so meta.json reads from the top
        return {'kind': 'tiktoken', 'name': self.name, 'vocab_size': self.vocab_size,
                'pattern': self.pattern, 'base_special_tokens': self.base_specials,
                'appended_special_tokens': list(self.appended), 'ranks': ranks_text(self.ranks)}


def ranks_text(ranks):
    """{token bytes: rank} -> tiktoken's file format: one 'base64(token bytes) rank' line each."""
    return ''.join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_ranks(text):
    """The inverse of ranks_text (tiktoken.load.load_tiktoken_bpe, without a file)."""
    return {base64.b64decode(token): int(rank) for token, rank in map(str.split, text.splitlines())}


def _is_file_name(value):
    return value.endswith('.tiktoken') or os.path.sep in value


def check_name(value):
    """None if value names a tokenizer (configurator's check of --tokenizer), else what is wrong."""
    import tiktoken
    names = tiktoken.list_encoding_names()
    if value == 'byte' or value in names or (_is_file_name(value) and os.path.isfile(value)):
        return None
    problem = 'no such file' if _is_file_name(value) else 'unknown tokenizer'
    return f"{problem}; expected 'byte', a tiktoken encoding ({', '.join(names)}) or a .tiktoken file"


def load_tiktoken(name_or_file):
    """A tiktoken encoding by name (needs tiktoken's cache or network) or from a .tiktoken file."""
    import tiktoken
    if _is_file_name(name_or_file):
        if not os.path.exists(name_or_file):
            raise FileNotFoundError(f"tokenizer file {name_or_file} does not exist")
        with open(name_or_file) as f:
            ranks = parse_ranks(f.read())
        return TiktokenTokenizer(os.path.splitext(os.path.basename(name_or_file))[0], ranks, BPE_PATTERN)
    try:
        base = tiktoken.get_encoding(name_or_file)
    except Exception as e:  # no network, unknown name: both end the same way for the user
        raise RuntimeError(
            f"cannot load tiktoken encoding '{name_or_file}' offline ({type(e).__name__}: {e}). "
            f"Copy its .tiktoken file to this machine and pass --tokenizer=/path/to/{name_or_file}"
            f".tiktoken, or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache, "
            f"or use --tokenizer=byte or --bpe_vocab=N") from None
    return TiktokenTokenizer(name_or_file, base._mergeable_ranks, base._pat_str, base._special_tokens)


def from_meta(desc):
    """The tokenizer a describe() dict holds (meta.json's and a checkpoint's 'tokenizer')."""
    if desc['kind'] == 'byte':
        tokenizer = ByteTokenizer()
    elif 'ranks' in desc:
        tokenizer = TiktokenTokenizer(desc['name'], parse_ranks(desc['ranks']), desc['pattern'],
                                      desc['base_special_tokens'],
                                      desc.get('appended_special_tokens', SPECIALS))
    else:  # datasets written before describe() held the merges: {'file': path or None, 'name'}
        tokenizer = load_tiktoken(desc['file'] or desc['name'])
    if tokenizer.vocab_size != desc['vocab_size']:
        raise ValueError(f"tokenizer {desc.get('name', desc['kind'])} has {tokenizer.vocab_size} "
                         f"tokens, its description says {desc['vocab_size']}")
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Byte-level BPE training

def train_bpe(texts, vocab_size):
    """Learn a byte-level BPE with vocab_size tokens (256 bytes + merges) -> {bytes: rank}."""
    if vocab_size < 256:
        raise ValueError(f"bpe_vocab must be at least 256 (the byte tokens), got {vocab_size}")
    word_counts = collections.Counter()
    pattern = re.compile(BPE_PATTERN)
    for text in texts:
        for piece in _SPECIAL_RE.split(text):
            word_counts.update(pattern.findall(piece))
    words = [list(w.encode('utf-8')) for w in word_counts]
    freqs = list(word_counts.values())
    vocab = [bytes([i]) for i in range(256)]

    # pair -> total count, and pair -> words holding it, kept up to date merge by merge
    pair_counts, pair_words = collections.Counter(), collections.defaultdict(set)
    for w, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(w)

    while len(vocab) < vocab_size and pair_counts:
        # most frequent pair; ties broken by the pair itself so the result is deterministic
        best = max(pair_counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        if pair_counts[best] < 2:
            break
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for w in list(pair_words[best]):
            symbols, freq = words[w], freqs[w]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= freq
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged, i = [], 0
            while i < len(symbols):
                at_best = i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best
                merged.append(new_id if at_best else symbols[i])
                i += 2 if at_best else 1
            words[w] = merged
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += freq
                pair_words[pair].add(w)
        del pair_words[best]
    return {token: rank for rank, token in enumerate(vocab)}


def write_tiktoken_file(ranks, path):
    """tiktoken's file format (see ranks_text), written atomically."""
    with open(path + '.tmp', 'w') as f:
        f.write(ranks_text(ranks))
    os.replace(path + '.tmp', path)
