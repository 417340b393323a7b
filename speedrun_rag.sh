#!/usr/bin/env bash
# The whole pipeline in one command. On a CPU it uses the embedded offline default
# (a generated knowledge world) and a tiny model.
#   bash speedrun_rag.sh
set -euo pipefail
cd "$(dirname "$0")"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# --- environment -------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch==2.13.0     # CPU wheel; on a GPU box install your CUDA torch first
fi
.venv/bin/pip install -q -e .
PY=.venv/bin/python

# --- tokenizer -> tiny pretraining -> a sample ----------------------------------------------
$PY -m scripts.tok_train --vocab-size 2048 --max-chars 5000000
$PY -m scripts.base_train --depth 4 --aspect-ratio 32 --head-dim 32 --max-seq-len 512 \
    --device-batch-size 8 --num-iterations 300 --eval-every 100 --sample-every 0 --run dummy
$PY -m scripts.chat_cli --source base -p "Zarak was born in" --max-tokens 32
