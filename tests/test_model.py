"""model.py: shapes, the masked loss, parameter count, document masking and the KV cache."""
import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, kernels='torch')
    return GPT(GPTConfig(**{**cfg, **kw}))


def packed_rows(lengths, T, vocab=50, seed=0):
    """Rows of back-to-back dialogs of the given lengths -> idx, doc_ids (-1 = padding)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (len(lengths), T), generator=g)
    doc = torch.full((len(lengths), T), -1)
    for r, row in enumerate(lengths):
        start = 0
        for d, n in enumerate(row):
            doc[r, start:start + n] = d
            start += n
    return idx, doc


def test_paper_size_model_has_2612_parameters():
    model = GPT(GPTConfig(vocab_size=260, n_embd=4, n_layer=2, n_head=2))
    assert model.num_params() == 2612
    assert GPT(GPTConfig(vocab_size=260, n_embd=4, n_layer=2, n_head=2, tie_embeddings=True)).num_params() == 2612 - 1040


def test_forward_backward_shapes_and_every_parameter_gets_a_gradient():
    model = tiny()
    idx = torch.randint(0, 50, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, 50) and loss is None
    _, loss = model(idx, targets=torch.randint(0, 50, (3, 20)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize('packed', [False, True])
def test_masked_loss_is_the_mean_over_masked_positions(packed):
    model = tiny()
    idx, doc = packed_rows([[7, 9], [20]], 24)
    targets = torch.randint(0, 50, (2, 24))
    mask = torch.rand(2, 24) < 0.5
    doc_ids = doc if packed else None
    if packed:
        mask &= doc >= 0
    logits, _ = model(idx, doc_ids=doc_ids)
    logp = F.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    expected = -(logp * mask).sum() / mask.sum()
    _, loss = model(idx, targets, mask, doc_ids)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # float32 logits vs float64
    if packed:  # training's path: the same loss without logits where there is no loss
        assert model.packed_loss(idx, targets, mask, doc_ids).item() == pytest.approx(expected.item(), rel=1e-5)


def test_packed_dialogs_compute_what_they_compute_alone():
    model = tiny()
    lengths = [[5, 11, 3], [19], [8, 8]]
    idx, doc = packed_rows(lengths, 20)
    logits, _ = model(idx, doc_ids=doc)
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            alone, _ = model(idx[r:r + 1, start:start + n])
            # float32, same math in another layout: summation order differs by a few ulps
            torch.testing.assert_close(logits[r, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
            start += n


@pytest.mark.parametrize('n_buckets', [1, 3, 50])
def test_loss_and_gradients_do_not_depend_on_the_bucketing(monkeypatch, n_buckets):
    """Padding slots inside the grids carry no loss and are never attended to by real tokens."""
    import model as model_module
    lengths = [[5, 11, 3], [19], [8, 8], [2, 2, 2, 2, 2]]
    idx, doc = packed_rows(lengths, 20)
    targets, mask = torch.randint(0, 50, (4, 20)), (torch.rand(4, 20) < 0.7) & (doc >= 0)
    results = []
    for n in (8, n_buckets):
        monkeypatch.setattr(model_module.DialogLayout, 'n_buckets', n)
        model = tiny()
        loss = model.packed_loss(idx, targets, mask, doc)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_equal_those_of_the_loss_over_every_position():
    """Training computes the last block past attention, and the output layer, at loss slots only."""
    lengths = [[5, 11, 3], [19], [8, 8], [2, 2, 2, 2, 2]]
    idx, doc = packed_rows(lengths, 20)
    targets, mask = torch.randint(0, 50, (4, 20)), (torch.rand(4, 20) < 0.5) & (doc >= 0)
    grads = []
    for pruned in (True, False):
        model = tiny(n_layer=3)
        if pruned:
            loss = model.packed_loss(idx, targets, mask, doc)
        else:  # every real position through every layer, then the masked mean by hand
            logits, _ = model(idx, doc_ids=doc)
            losses = F.cross_entropy(logits.view(-1, 50), targets.view(-1), reduction='none')
            loss = (losses * mask.view(-1)).sum() / mask.sum()
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_counts_take_few_values_and_waste_little():
    from model import padded_count
    counts = [padded_count(n) for n in range(1, 40_000)]
    assert all(0 <= c - n < max(64, n / 32) for n, c in zip(range(1, 40_000), counts))
    assert len(set(counts[18_000:20_000])) <= 5  # the slot counts of batch 128 x 257


def test_changing_one_dialog_leaves_the_others_untouched():
    model = tiny()
    idx, doc = packed_rows([[6, 10, 4]], 20)
    logits, _ = model(idx, doc_ids=doc)
    changed = idx.clone()
    changed[0, 6:16] = (changed[0, 6:16] + 1) % 50  # rewrite the middle dialog
    new_logits, _ = model(changed, doc_ids=doc)
    assert torch.equal(logits[0, :6], new_logits[0, :6])
    torch.testing.assert_close(logits[0, 16:20], new_logits[0, 16:20], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits[0, 6:16], new_logits[0, 6:16])


def test_kv_cache_decoding_matches_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 50, (3, 40))
    full, _ = model(idx)
    model.setup_cache(3, 48)
    length = torch.tensor([5, 12, 7])
    # prefill lanes of different lengths, right-padded
    logits = model.prefill(idx[:, :12], length)
    for b in range(3):
        torch.testing.assert_close(logits[b], full[b, length[b] - 1], rtol=1e-5, atol=1e-5)
    # then lanes append different numbers of tokens at once (a tool answer), then one at a time
    for n_new in [torch.tensor([3, 1, 6])] + [torch.ones(3, dtype=torch.long)] * 15:
        offsets = length[:, None] + torch.arange(int(n_new.max()))
        step = idx.gather(1, offsets.clamp(max=39))
        logits = model.decode(step, n_new)
        length = length + n_new
        assert torch.equal(model.cache_lengths, length)
        for b in range(3):
            torch.testing.assert_close(logits[b], full[b, length[b] - 1], rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match='heads'):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match='kernels'):
        GPTConfig(kernels='cuda')
    with pytest.raises(ValueError, match='block_size'):
        tiny()(torch.zeros(1, 49, dtype=torch.long))


def test_flops_and_mfu():
    model = tiny()
    assert model.flops_per_token(48) > 6 * (model.num_params() - 50 * 32)
    assert model.estimate_mfu(1000.0, 48, 1e12) == pytest.approx(model.flops_per_token(48) * 1000 / 1e12)


def test_bfloat16_kv_cache_stays_close_to_float32():
    model = tiny().eval()
    idx = torch.randint(0, 50, (2, 30))
    full, _ = model(idx)
    model.setup_cache(2, 48, dtype=torch.bfloat16)
    length = torch.tensor([10, 20])
    model.prefill(idx[:, :20], length)
    for _ in range(8):
        logits = model.decode(idx.gather(1, length[:, None]))
        length = length + 1
        for b in range(2):  # keys and values rounded to bfloat16's 8 bits: ~1e-2 relative
            torch.testing.assert_close(logits[b], full[b, length[b] - 1], rtol=2e-2, atol=2e-2)


def test_a_bfloat16_model_decodes_over_a_float32_cache():
    """Heads of 32: the C attention serves the float32 cache (where it builds), the norms and
    SwiGLU stay PyTorch's for the bfloat16 activations."""
    model = tiny(n_embd=128).eval()
    idx = torch.randint(0, 50, (2, 30))
    full, _ = model(idx)
    model = model.to(torch.bfloat16)
    model.setup_cache(2, 48, dtype=torch.float32)
    logits = model.prefill(idx[:, :20], torch.tensor([10, 20]))
    for b, length in enumerate([10, 20]):  # bfloat16 weights: ~1e-2 relative
        torch.testing.assert_close(logits[b].float(), full[b, length - 1], rtol=2e-2, atol=2e-2)


# heads of 8: PyTorch's attention; of 32: the C loops' where they build, lanes in groups of ~6 tokens
# too; and one layer of 128, whose weights fit in a core's caches: every block in one C call
@pytest.mark.parametrize('n_embd,n_layer,group', [(32, 2, 1024), (128, 2, 1024), (128, 2, 6), (128, 1, 1024)])
def test_decoding_a_few_rows_and_dropping_lanes_keeps_every_lane_exact(n_embd, n_layer, group, monkeypatch):
    """agent.py splices a tool's answer into a few lanes only, and drops finished lanes."""
    import model as model_py
    monkeypatch.setattr(model_py, 'GROUP_TOKENS', group)
    model = tiny(n_embd=n_embd, n_layer=n_layer).eval()
    idx = torch.randint(0, 50, (4, 40))
    full, _ = model(idx)
    model.setup_cache(4, 48)
    length = torch.tensor([5, 8, 6, 7])
    model.prefill(idx[:, :8], length)
    rows, n_new = torch.tensor([1, 3]), torch.tensor([4, 2])  # answers of 4 and 2 tokens
    step = idx[rows].gather(1, length[rows, None] + torch.arange(4))
    logits = model.decode(step, n_new, rows=rows)
    length[rows] += n_new
    assert torch.equal(model.cache_lengths, length)
    for i, b in enumerate(rows.tolist()):
        torch.testing.assert_close(logits[i], full[b, length[b] - 1], rtol=1e-5, atol=1e-5)
    keep = torch.tensor([True, False, True, True])
    model.keep_lanes(keep)
    lanes = keep.nonzero().squeeze(1)
    logits = model.decode(idx[lanes].gather(1, length[lanes, None]))
    for i, b in enumerate(lanes.tolist()):
        torch.testing.assert_close(logits[i], full[b, length[b]], rtol=1e-5, atol=1e-5)
    length[lanes] += 1
    rows = torch.tensor([0, 2])  # of the lanes kept: lanes 0 and 3
    logits = model.decode(idx[lanes[rows]].gather(1, length[lanes[rows], None] + torch.arange(3)), rows=rows)
    for i, b in enumerate(lanes[rows].tolist()):
        torch.testing.assert_close(logits[i], full[b, length[b] + 2], rtol=1e-5, atol=1e-5)
    in_c = n_embd == 128 and cpu_kernels.attends('cpu', torch.float32, 32)
    assert model.blocks[0].attn.keys_in_tiles == in_c
    assert (model._weights_in_caches() is not None) == (n_embd == 32 or n_layer == 1)  # <= 1 MB of weights


def test_lanes_given_no_tokens_can_make_a_group_of_their_own():
    """decode_blocks cuts the lanes into groups of ~48 tokens: after a lane of 48, two lanes given
    none make a group of no tokens (finished lanes in agent.py; a division by its size once
    stopped train.py with SIGFPE)."""
    model = tiny(n_embd=128, n_layer=1).eval()
    idx = torch.randint(0, 50, (3, 48))
    full, _ = model(idx)
    model.setup_cache(3, 48)
    logits = model.prefill(idx, torch.tensor([48, 0, 0]))
    torch.testing.assert_close(logits[0], full[0, 47], rtol=1e-5, atol=1e-5)
    assert model.cache_lengths.tolist() == [48, 0, 0] and model._weights_in_caches() is not None


@pytest.mark.parametrize('seed', range(4))
def test_one_call_for_every_block_computes_what_the_blocks_compute(seed, monkeypatch):
    """decode_blocks against the same C loops called block by block, on lanes given 0 to 40 tokens
    (empty lanes, lanes longer than a group, groups of empty lanes), then drafts of 0 to 8 more."""
    import model as model_py
    model = tiny(n_embd=128, n_layer=1).eval()
    g = torch.Generator().manual_seed(seed)
    lanes = 40
    idx = torch.randint(0, 50, (lanes, 48), generator=g)
    prompts = torch.randint(0, 41, (lanes,), generator=g) * (torch.rand(lanes, generator=g) < 0.7)
    drafts = torch.randint(0, 9, (lanes,), generator=g)
    outputs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(model_py.GPT, '_weights_in_caches', lambda self: None)
        model.setup_cache(lanes, 48)
        first = model.prefill(idx[:, :40], prompts)
        then = model.decode(idx[:, 40:48], drafts, every=True)
        outputs.append((first[prompts > 0], then))
    assert len(outputs[1][1]) == int(drafts.sum())
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_each_generation_reads_the_weights_as_they_are():
    """decode_blocks' transposed copies of the weights are made again for each new cache: after a
    training step of train.py's optimizer (fused AdamW, which changes weights without bumping
    their versions) and after a round trip through bfloat16."""
    model = tiny(n_embd=128, n_layer=1).eval()
    optimizer = model.configure_optimizer(0.1, 0.01, (0.9, 0.95), 'cpu')
    idx = torch.randint(0, 50, (2, 12))
    for change in (optimizer.step, lambda: model.to(torch.bfloat16).to(torch.float32)):
        model.setup_cache(2, 16)
        model.prefill(idx, torch.tensor([12, 12]))  # copies made of the weights as they are
        model.zero_grad()
        model(idx, idx)[1].backward()
        with torch.no_grad():
            change()
        full, _ = model(idx)
        model.setup_cache(2, 16)
        torch.testing.assert_close(model.prefill(idx, torch.tensor([12, 7])), full[[0, 1], [11, 6]],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n_embd', [32, 128])
def test_a_cache_set_up_again_is_reused_and_what_it_held_is_never_read(n_embd):
    model = tiny(n_embd=n_embd).eval()
    idx = torch.randint(0, 50, (3, 40))
    full, _ = model(idx)
    model.setup_cache(3, 48)
    model.prefill(torch.randint(0, 50, (3, 30)), torch.tensor([30, 30, 30]))  # other tokens, longer
    k_cache = model.blocks[0].attn.k_cache
    model.setup_cache(3, 48)
    assert model.blocks[0].attn.k_cache is k_cache
    length = torch.tensor([4, 9, 6])
    logits = model.prefill(idx[:, :9], length)
    for b in range(3):
        torch.testing.assert_close(logits[b], full[b, length[b] - 1], rtol=1e-5, atol=1e-5)


def test_checkpoints_load_as_plain_values_and_pickled_objects_are_refused(tmp_path):
    import argparse
    from dataclasses import asdict

    from model import CheckpointError
    model = tiny()
    ckpt = {'model': model.state_dict(), 'model_args': asdict(model.config),
            'config': {'data_dir': 'data', 'seeds': [1, 2]}, 'tokenizer': {'kind': 'byte'}}
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    loaded, back = GPT.from_checkpoint(str(tmp_path), 'cpu')
    assert back['config'] == ckpt['config'] and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (tmp_path / 'evil').mkdir()
    torch.save({**ckpt, 'config': argparse.Namespace(data_dir='data')}, tmp_path / 'evil' / 'ckpt.pt')
    with pytest.raises(CheckpointError, match='holds pickled Python objects') as refused:
        GPT.from_checkpoint(str(tmp_path / 'evil'), 'cpu')
    assert '\n' not in str(refused.value) and str(tmp_path / 'evil') in str(refused.value)
    (tmp_path / 'ckpt.pt').write_bytes((tmp_path / 'ckpt.pt').read_bytes()[:500])  # truncated
    with pytest.raises(CheckpointError, match='cannot be read.*corrupt'):
        GPT.from_checkpoint(str(tmp_path), 'cpu')


def transparent_huge_pages():
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return '[never]' not in f.read()
    except OSError:
        return False


def huge_kb_at(address):
    """AnonHugePages (kB) of the mapping of this process that holds address."""
    with open('/proc/self/smaps') as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if '-' in head and not head.endswith(':'):
                start, end = (int(a, 16) for a in head.split('-'))
                inside = start <= address < end
            elif inside and head == 'AnonHugePages:':
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(not transparent_huge_pages(), reason='Linux with transparent huge pages')
def test_a_new_cache_is_backed_by_huge_pages():
    """setup_cache's new tensors are on 2 MB pages (reuse()), fresh from the OS or, as in a long
    process, memory malloc's heap held on 4 KB pages already."""
    import model
    model.keep_freed_memory()  # what agent.py and train.py run with: freed blocks stay in the heap
    held = [torch.ones(4, 1024, 1024) for _ in range(8)]  # 16 MB each, from the heap, paged in
    del held
    for shape in ((16, 1024, 1024), (40, 1024, 1024)):  # from that heap; 160 MB: a new mapping
        cache = model.reuse(None, shape, 'cpu', torch.float32)
        cache.fill_(1.0)
        assert huge_kb_at(cache.data_ptr() + cache.numel() * 2) >= 2048
        del cache
