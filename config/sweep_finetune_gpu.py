# The paper's large-scale study at its sizes, on GPUs: SmolLM2 135M / 360M / 1.7B and Llama 3.2
# 1B / 3B, fine-tuned in-weight (qa) or in-tool (qatool) on up to tens of thousands of people.
# The Hugging Face folders are the user's own (e.g. huggingface-cli download HuggingFaceTB/
# SmolLM2-360M-Instruct --local-dir models/SmolLM2-360M-Instruct); nothing is downloaded here.
#   python sweep.py config/sweep_finetune_gpu.py                 # one worker per GPU
#   python sweep.py config/sweep_finetune_gpu.py --emit_jobs=jobs.txt   # a cluster array
#   python plot.py --results=sweeps/finetune_gpu/results.csv --out_dir=sweeps/finetune_gpu
# Not run by this project yet: the budgets below scale the CPU study's (config/sweep_finetune_cpu.py)
# and are a starting point, not a tuned grid.
out_dir = 'sweeps/finetune_gpu'
model = ['smollm2-135m', 'models/SmolLM2-360M-Instruct', 'models/SmolLM2-1.7B-Instruct',
         'models/Llama-3.2-1B-Instruct', 'models/Llama-3.2-3B-Instruct']
n_people = [50, 200, 1000, 5000, 20000]
dataset = ['qa', 'qatool']
seed = [0, 1, 2]
alpha = [1.0]
n_ood = 500
batch_size = 32            # rows of 512 tokens: ~16k tokens a step
block_size = 512
dtype = 'bfloat16'
lora_rank = 0
weight_decay = 0.0
warmup_iters = 20
# in-weight: ~6 epochs of its facts (4 N dialogs of ~31 tokens, ~16 a row): 0.05 N steps, at
# least 100; in-tool: a fixed 200 steps at a smaller rate, whatever N
max_iters = 5000
min_iters = 100
iters_per_person = 0.05
learning_rate = 2e-5
min_lr = 2e-6
per_dataset = {'qatool': {'max_iters': 200, 'iters_per_person': 0.0, 'learning_rate': 1e-5, 'min_lr': 1e-6}}
eval_interval = 100
eval_questions = 500
stop_value = 0.95
log_interval = 20
ckpt_interval = 10**9
drift_prompts = 0
drift_tokens = 64
hellaswag = ''             # e.g. 'hellaswag_val.jsonl' (the user's copy): acc_norm of base and tuned
hellaswag_n = 2000
