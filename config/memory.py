# The paper's controlled setup: byte tokenizer, rows of 257 tokens, a 2-layer, 2-head model of
# width 64, AdamW lr 1e-3 with weight decay 0.1, 50 warmup steps, then decay to 0.
# In-tool by default; the in-weight variant is one override away: --dataset=qa
out_dir = 'out/memory'
data_dir = 'data/default'
dataset = 'qatool'
batch_size = 128   # 128 rows x 257 tokens = ~33k tokens per step
block_size = 256
n_layer = 2
n_head = 2
n_embd = 64
learning_rate = 1e-3
min_lr = 0.0
weight_decay = 0.1
warmup_iters = 50
max_iters = 5000
