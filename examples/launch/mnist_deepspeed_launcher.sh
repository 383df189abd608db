#!/usr/bin/env bash
# The same example and the same JSON under the deepspeed launcher (ds_hylo.initialize):
# 2 processes, on CPU when there is no GPU. Same seed => same batches and same parameters as
# mnist_cpu_2proc.sh.
source "$(dirname "$0")/_common.sh"
NUM="${NUM_PROCS:-2}"
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then cpu_env; fi
deepspeed --num_gpus "$NUM" examples/train_mnist_deepspeed.py \
    --deepspeed_config configs/deepspeed/zero1_kid_fp32.json "${MNIST_ARGS[@]}" "$@"
