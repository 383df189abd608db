#!/usr/bin/env bash
# The MiniLM fine-tuning on 2 CPU processes under ZeRO-3 (fp32): the ZeRO-3 path end to end on a laptop.
source "$(dirname "$0")/_common.sh"
cpu_env
accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \
    --deepspeed_config_file configs/deepspeed/finetune_minilm_hylo_zero3.json \
    examples/finetune_transformer.py --epochs 1 --max-length 64 --log-every 10 "$@"
