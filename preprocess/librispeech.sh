#!/usr/bin/env bash
# LibriSpeech subsets -> one feature store per subset.
#   preprocess/librispeech.sh LIBRISPEECH_DIR ALPHABET OUTPUT_DIR [dstrain preprocess flags...]
set -euo pipefail
ROOT=$1 ALPHABET=$2 OUT=$3; shift 3
dstrain import librispeech "$ROOT" --output_dir "$OUT/csv"
for csv in "$OUT"/csv/*.csv; do
  name=$(basename "$csv" .csv)
  [ "$name" = import_rejects ] && continue
  dstrain preprocess --csv "$csv" --alphabet "$ALPHABET" --output "$OUT/$name" "$@"
done
