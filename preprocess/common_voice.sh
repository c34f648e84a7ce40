#!/usr/bin/env bash
# A Common Voice release -> train/dev/test feature stores on shared storage.
#   preprocess/common_voice.sh CV_LANGUAGE_DIR ALPHABET OUTPUT_DIR [dstrain preprocess flags...]
# e.g. preprocess/common_voice.sh /data/cv-corpus/en /data/alphabet.txt /data/stores --workers 32 --feature_dtype float16
# Across nodes, run the preprocess lines under mpirun/srun (slurm/preprocess.sbatch).
set -euo pipefail
CV=$1 ALPHABET=$2 OUT=$3; shift 3
dstrain import cv2 "$CV" --filter_alphabet "$ALPHABET"
for split in train dev test; do
  dstrain preprocess --csv "$CV/clips/$split.csv" --alphabet "$ALPHABET" --output "$OUT/$split" "$@"
done
dstrain shards info "$OUT/train" "$OUT/dev" "$OUT/test" --no_verify
