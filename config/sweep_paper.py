# The paper's grid (arXiv 2508.20755), for GPUs: N = 2 to 32,768 people (powers of 2, 15 values),
# in-weight and in-tool, widths 4 to 128 (6), 2 layers, 2 heads, 10 seeds:
# 15 x 2 x 6 x 10 = 1,800 runs, at most 19.3M steps in all (early stops cut that).
#   python sweep.py config/sweep_paper.py --workers=32          # one node: several runs per GPU
#   python sweep.py config/sweep_paper.py --emit_jobs=jobs.txt  # a cluster: one line per run,
#   sbatch --array=1-$(wc -l < jobs.txt) --wrap 'sed -n "${SLURM_ARRAY_TASK_ID}p" jobs.txt | bash'
# Compressibility (claim 3) is a second sweep, in-weight only; families share attributes only
# once people share last names (2,627 of them in atoms/), i.e. in the upper half of this grid:
#   python sweep.py config/sweep_paper.py --out_dir=sweeps/paper_alpha --dataset="['qa']" \
#       --alpha='[0.0, 0.25, 0.5, 0.75]'
#   python plot.py --results=sweeps/paper/results.csv,sweeps/paper_alpha/results.csv
out_dir = 'sweeps/paper'
n_people = [2 ** k for k in range(1, 16)]
dataset = ['qa', 'qatool']
n_embd = [4, 8, 16, 32, 64, 128]
n_layer = [2]
n_head = [2]
seed = list(range(10))
alpha = [1.0]
n_ood = 1000
# config/memory.py's setup: byte tokenizer, rows of 257 tokens, AdamW 1e-3, weight decay 0.1
batch_size = 128           # 128 rows: ~450 qa or 128 qatool dialogs a step
block_size = 256
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
weight_decay = 0.1
# steps: 2000 + 2 per person (~225 epochs of the facts), up to 70,000 for 32,768 people
max_iters = 70_000
min_iters = 2000
iters_per_person = 2.0
eval_interval = 500
eval_questions = 1000      # per split; every fact for N <= 250
stop_value = 0.95
log_interval = 100
