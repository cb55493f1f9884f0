# The paper's controlled study at CPU size: claim 1 (parameters needed against facts, in-weight vs
# in-tool) and claim 2 (in-tool recall on never-seen people switching on with training people),
# on 2 cores in under an hour (estimate: 35-55 min). Then: python plot.py --out_dir=figures
#   python sweep.py config/sweep_cpu.py
out_dir = 'sweeps/cpu'
n_people = [4, 16, 64, 256, 1024, 4096]  # 16 to 16,384 facts: three orders of magnitude
dataset = ['qa', 'qatool']               # in-weight, in-tool
n_embd = [8, 16, 32, 64]                 # 6,248 / 16,592 / 49,568 / 164,672 params
n_layer = [2]
n_head = [2]
seed = [0]
alpha = [1.0]
# in-weight runs that cannot pass in a CPU budget: 4096 facts in <= 17k params, 16384 facts at all.
# 6 x 2 x 4 - 6 = 42 runs.
exclude = [{'dataset': 'qa', 'n_people': 4096},
           {'dataset': 'qa', 'n_people': 1024, 'n_embd': 8},
           {'dataset': 'qa', 'n_people': 1024, 'n_embd': 16}]
n_ood = 200                # never-trained people: 800 OOD questions
# config/quick.py's recipe, which takes width 64 to recall >= 0.9 on OOD people in ~2000 steps
batch_size = 64            # 64 rows x 257 tokens: ~220 qa or 64 qatool dialogs a step
block_size = 256           # qatool dialogs are up to 194 tokens
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
weight_decay = 0.1
# steps: min(2000, 200 + 4 * n_people) = 216, 264, 456, 1224, 2000, 2000; ~220 epochs of a
# small population's facts (memorising 64 people took ~220 epochs at width 32)
max_iters = 2000
min_iters = 200
iters_per_person = 4.0
eval_interval = 200        # recall on min(4 N, 200) questions per split; early stop at 0.95
eval_questions = 200
stop_value = 0.95
log_interval = 50
# Measured on 1 thread of the 2-core dev box (shared, so pessimistic), ms per step at batch 64:
# width 8 ~100, 16 ~120, 32 ~140, 64 ~270. With no early stop at all: ~6,000 s of training plus
# ~350 s of evaluation, split over 2 workers = ~53 min; early stops and an idle box make it less.
