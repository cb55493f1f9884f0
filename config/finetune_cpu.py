# One run of the large-scale study on 2 CPU cores: SmolLM2-135M-Instruct fully fine-tuned in-tool
# on 80 people's facts, as config/sweep_finetune_cpu.py runs it (~5 min here, float32):
#   python prepare_data.py --tokenizer=smollm2-135m --out_dir=data/smollm2_80 --n_people=80 --n_ood=50
#   python train.py config/finetune_cpu.py
#   python drift.py --out_dir=out/finetune_cpu --base=smollm2-135m
# In-weight instead: --dataset=qa --max_iters=60 --learning_rate=5e-5 --min_lr=5e-6
# --stop_metric=recall --out_dir=out/finetune_cpu_qa
init_from = 'smollm2-135m'
dtype = 'float32'          # as measured ('auto': bfloat16 on CPUs with it)
out_dir = 'out/finetune_cpu'
data_dir = 'data/smollm2_80'
dataset = 'qatool'
batch_size = 4             # rows of 256 tokens: ~3 qatool dialogs each, ~1,000 tokens a step
block_size = 256
learning_rate = 3e-5       # full fine-tuning: every weight moves, so a small step
min_lr = 1e-5
warmup_iters = 5
weight_decay = 0.0         # it would pull the weights to zero, not back to the base model
max_iters = 40             # ~480 dialogs: the template is all there is to learn (24 steps at 1e-5
                           # left the column of 'Where does X live?' unlearnt, recall 0.53)
eval_interval = 20
eval_questions = 32        # per split, through agent.py
stop_metric = 'recall_min'
stop_value = 0.95
log_interval = 4
