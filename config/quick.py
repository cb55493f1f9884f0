# A CPU-sized in-tool run for the README's main command: the paper's small model (width 64,
# 2 layers, 2 heads) on the default 1000 people, stopping once recall reaches 0.97 on 200
# questions about trained and about never-seen people (a margin over the 0.95 the README states
# for 1000). A step holds 64 rows = ~64 whole dialogs (~9k tokens).
out_dir = 'out/quick'
data_dir = 'data/default'
dataset = 'qatool'
batch_size = 64
block_size = 256
n_layer = 2
n_head = 2
n_embd = 64
learning_rate = 3e-3
min_lr = 1e-4
warmup_iters = 50
weight_decay = 0.1
max_iters = 4000          # a budget, not a plan: runs stop at 2,250-2,750 once recall is there
log_interval = 50
eval_interval = 250
eval_questions = 200      # per split, through agent.py
stop_metric = 'recall_min'
stop_value = 0.97
ckpt_interval = 500
