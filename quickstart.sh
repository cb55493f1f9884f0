#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, prepare the default data, summarise.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
python prepare_data.py --overwrite=True
