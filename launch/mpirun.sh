#!/usr/bin/env bash
# dstrain train under Open MPI's mpirun (Horovod's MPI controller), hosts from HOSTFILE (see hostfile.example) or
# the SLURM allocation this runs in.
#
#   HOSTFILE=launch/hostfile.example launch/mpirun.sh --train_files ... --alphabet_config_path ...
set -euo pipefail
exec dstrain launch --launcher mpirun ${NP:+--np "$NP"} ${HOSTFILE:+--hostfile "$HOSTFILE"} ${LOG_DIR:+--log_dir "$LOG_DIR"} \
  -- dstrain train "$@"
