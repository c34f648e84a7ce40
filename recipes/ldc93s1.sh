#!/usr/bin/env bash
# LDC93S1 end to end, as DeepSpeech's bin/run-ldc93s1.sh: one utterance, overfitted to its exact transcript by two
# Horovod processes on CPU. `make demo` runs launch/run_ldc93s1.sh, the same job.
#   recipes/ldc93s1.sh [WORKDIR]
set -euo pipefail
exec "$(dirname "$0")/../launch/run_ldc93s1.sh" "$@"
