#!/bin/bash
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=/tmp/lmcheck/hfhome
HERE=$(cd "$(dirname "$0")" && pwd)
exec nice /tmp/lmcheck/venv/bin/lm_eval --model hf \
  --model_args pretrained=$HOME/.cache/come_fast/smollm2-135m,dtype=float32 \
  --tasks piqa_local,hellaswag_local,openbookqa_local --limit 300 --batch_size 8 --device cpu \
  --include_path "$HERE/tasks" --log_samples --output_path /tmp/lmcheck/out
