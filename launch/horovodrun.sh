#!/usr/bin/env bash
# dstrain train on NP processes of this machine (or HOSTS) through horovodrun's Gloo controller.
#
#   NP=8 launch/horovodrun.sh --train_files /data/stores/train --dev_files /data/stores/dev \
#       --alphabet_config_path /data/alphabet.txt --checkpoint_dir /data/runs/a --automatic_mixed_precision
#   HOSTS=gpu01:8,gpu02:8 launch/horovodrun.sh ...       # two nodes (passwordless ssh between them)
#
# Per-rank thread and Horovod fusion defaults come from dstrain launch; every flag is passed to dstrain train.
set -euo pipefail
NP=${NP:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 1}')}
exec dstrain launch --launcher horovodrun --np "$NP" ${HOSTS:+--hosts "$HOSTS"} ${LOG_DIR:+--log_dir "$LOG_DIR"} \
  -- dstrain train "$@"
