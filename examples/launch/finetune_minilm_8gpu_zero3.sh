#!/usr/bin/env bash
# Fine-tune all-MiniLM-L6-v2 on 8 GPUs under ZeRO-3 (bf16), HyLo preconditioning each layer in
# DeepSpeed's gradient hooks (docs/design.md section 3.5).
source "$(dirname "$0")/_common.sh"
accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml \
    --deepspeed_config_file configs/deepspeed/finetune_minilm_hylo_zero3_bf16.json \
    examples/finetune_transformer.py "$@"
