#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, prepare the default data (1000 people to
# train on, 1000 never seen), train the paper's small model to use the database
# (config/quick.py), measure recall on both populations, and show a dialog.
set -euo pipefail
cd "$(dirname "$0")"
start=$SECONDS
python -m pip install -q -r requirements.txt
python prepare_data.py --out_dir=data/default --overwrite=True
python train.py config/quick.py --overwrite=True
python agent.py --out_dir=out/quick --split=train --n=1000 | tee out/quick/recall_train.json
python agent.py --out_dir=out/quick --split=ood --n=1000 | tee out/quick/recall_ood.json
echo; echo "A dialog about someone the model never saw:"
python sample.py --out_dir=out/quick --num_random=2 --population=ood --seed=$RANDOM
python - "$((SECONDS - start))" <<'PY'
import json, sys
rows = [json.load(open(f'out/quick/recall_{s}.json')) for s in ('train', 'ood')]
print(f"\n{'people':<22}{'recall':>8}{'questions':>11}{'prompts/s':>11}{'tool calls':>12}")
for name, r in zip(('trained on', 'never seen (OOD)'), rows):
    print(f"{name:<22}{r['accuracy']:>8.3f}{r['n']:>11}{r['prompts_per_s']:>11.0f}{r['tool_calls']:>12}")
print(f"\ntotal time {int(sys.argv[1]) // 60} min {int(sys.argv[1]) % 60} s")
PY
