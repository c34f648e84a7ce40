#!/usr/bin/env bash
# The main job on the bundled LDC93S1 sample, as `make demo` runs it:
#   import -> preprocess to Parquet shards -> 2-process Horovod training on CPU -> export -> transcribe.
# Re-running is cheap: the store is kept, and training resumes from (or finds complete) its checkpoint.
#
#   launch/run_ldc93s1.sh [WORKDIR]        (default build/ldc93s1; needs the .venv from tools/install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-build/ldc93s1}
NP=${NP:-2}
EPOCHS=${EPOCHS:-300}
export PATH="$PWD/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL=2
ALPHABET=dstrain/data/alphabet.txt

dstrain import ldc93s1 "$WORK/data" >/dev/null
if [ ! -f "$WORK/shards/_manifest.json" ]; then
  dstrain preprocess --csv "$WORK/data/ldc93s1.csv" --alphabet "$ALPHABET" --output "$WORK/shards"
fi
# DeepSpeech's bin/run-ldc93s1.sh flags; one TensorFlow thread per rank since the ranks share the cores.
horovodrun -np "$NP" -H "localhost:$NP" --gloo \
  dstrain train \
    --train_files "$WORK/shards" --dev_files "$WORK/shards" --test_files "$WORK/shards" \
    --alphabet_config_path "$ALPHABET" \
    --n_hidden 100 --epochs "$EPOCHS" --learning_rate 0.002 --train_batch_size 1 \
    --checkpoint_dir "$WORK/checkpoints" --export_dir "$WORK/export" \
    --inter_op_parallelism_threads 1 --intra_op_parallelism_threads 1
dstrain transcribe --model "$WORK/export" --audio dstrain/data/LDC93S1.wav
