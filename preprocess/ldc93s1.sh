#!/usr/bin/env bash
# LDC93S1 -> feature store (what make demo does first).
#   preprocess/ldc93s1.sh [WORKDIR]            (default build/ldc93s1)
set -euo pipefail
WORK=${1:-build/ldc93s1}
dstrain import ldc93s1 "$WORK/data"
dstrain preprocess --csv "$WORK/data/ldc93s1.csv" --alphabet "$(dirname "$0")/../dstrain/data/alphabet.txt" \
  --output "$WORK/shards" "${@:2}"
