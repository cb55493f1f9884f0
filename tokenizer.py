"""
Tokenizers: bytes (the default, vocab 260), any tiktoken encoding, or a byte-level BPE learned on
our own text and saved as a .tiktoken file, so no network is ever needed.

Every tokenizer appends the four special tokens after its base vocabulary, in this order.
Dialog text spells them out literally, e.g. '<|user|>When was Ada Smith born?<|assistant|>...'.
"""
import base64
import collections
import os
import re

import numpy as np

SPECIAL_TOKENS = ('<|user|>', '<|assistant|>', '<|database|>', '<|eod|>')
USER, ASSISTANT, DATABASE, EOD = range(4)  # index into a tokenizer's special_ids

# Pre-tokenization for our BPE (words, numbers, punctuation runs, whitespace), ASCII classes so
# Python's re and tiktoken's Rust regex split text the same way.
BPE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
_SPECIAL_RE = re.compile('|'.join(re.escape(s) for s in SPECIAL_TOKENS))


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; the special tokens are 256-259."""
    kind = 'byte'
    base_vocab = 256
    vocab_size = 260
    special_ids = tuple(range(256, 260))

    # Each special token is swapped for a control byte the data never holds, so a whole chunk
    # of text is tokenized by one encode() and one numpy remap instead of a loop over tokens.
    _PLACEHOLDERS = {s: chr(1 + i) for i, s in enumerate(SPECIAL_TOKENS)}

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
        return self.encode_concat([text]).tolist()

    def decode(self, ids):
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode('utf-8', errors='replace'))
            out.append(SPECIAL_TOKENS[i - 256])
            pending = bytearray()
        out.append(pending.decode('utf-8', errors='replace'))
        return ''.join(out)

    def decode_bytes(self, ids):
        """Raw bytes of non-special tokens (the SQL tool gets the model's bytes as written)."""
        return bytes(i for i in ids if i < 256)

    def describe(self):
        return {'kind': 'byte', 'vocab_size': self.vocab_size}


class TiktokenTokenizer:
    """A tiktoken encoding with our four special tokens appended after its vocabulary."""
    kind = 'tiktoken'

    def __init__(self, base, name, file=None):
        import tiktoken
        self.name, self.file = name, file
        self.base_vocab = base.n_vocab
        specials = {s: base.n_vocab + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=f'{base.name}+itl', pat_str=base._pat_str,
                                     mergeable_ranks=base._mergeable_ranks,
                                     special_tokens={**base._special_tokens, **specials})
        self.special_ids = tuple(specials.values())
        self.vocab_size = base.n_vocab + len(SPECIAL_TOKENS)

    def encode_concat(self, texts):
        ids = self.enc.encode_batch(texts, allowed_special=set(SPECIAL_TOKENS), num_threads=2)
        dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        return np.fromiter((t for dialog in ids for t in dialog), dtype=dtype)

    def encode(self, text):
        return self.enc.encode(text, allowed_special=set(SPECIAL_TOKENS))

    def decode(self, ids):
        return self.enc.decode(list(ids), errors='replace')

    def decode_bytes(self, ids):
        return self.enc.decode_bytes([i for i in ids if i not in self.special_ids])

    def describe(self):
        return {'kind': 'tiktoken', 'name': self.name, 'file': self.file,
                'vocab_size': self.vocab_size}


def load_tiktoken(name_or_file):
    """A tiktoken encoding by name (needs tiktoken's cache or network) or from a .tiktoken file."""
    import tiktoken
    import tiktoken.load
    if name_or_file.endswith('.tiktoken') or os.path.sep in name_or_file:
        if not os.path.exists(name_or_file):
            raise FileNotFoundError(f"tokenizer file {name_or_file} does not exist")
        ranks = tiktoken.load.load_tiktoken_bpe(name_or_file)
        name = os.path.splitext(os.path.basename(name_or_file))[0]
        base = tiktoken.Encoding(name=name, pat_str=BPE_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})
        return TiktokenTokenizer(base, name, file=os.path.abspath(name_or_file))
    try:
        base = tiktoken.get_encoding(name_or_file)
    except Exception as e:  # no network, unknown name: both end the same way for the user
        raise RuntimeError(
            f"cannot load tiktoken encoding '{name_or_file}' offline ({type(e).__name__}: {e}). "
            f"Copy its .tiktoken file to this machine and pass --tokenizer=/path/to/{name_or_file}"
            f".tiktoken, or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache, "
            f"or use --tokenizer=byte or --bpe_vocab=N") from None
    return TiktokenTokenizer(base, name_or_file)


def from_meta(tok_meta):
    """The tokenizer described in a dataset's meta.json (see describe())."""
    if tok_meta['kind'] == 'byte':
        return ByteTokenizer()
    return load_tiktoken(tok_meta['file'] or tok_meta['name'])


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
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[w] = merged
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += freq
                pair_words[pair].add(w)
        del pair_words[best]
    return {token: rank for rank, token in enumerate(vocab)}


def write_tiktoken_file(ranks, path):
    """tiktoken's file format: one 'base64(token bytes) rank' line per token."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    os.replace(tmp, path)
