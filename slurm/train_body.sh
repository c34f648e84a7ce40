# Shared body of train.sbatch and train_multinode.sbatch (sourced; not a job script itself).
# srun, not mpirun, starts the ranks: SLURM itself places, signals and cleans up every rank (the USR1 warning of
# --signal reaches them all), and its PMIx server wires up MPI, so Horovod needs neither ssh nor a hostfile.
# Sites whose OpenMPI lacks PMIx support can set LAUNCH=mpirun (mpirun reads the allocation from SLURM).
set -uo pipefail
: "${TRAIN_FILES:?set TRAIN_FILES to the training feature store(s) on shared storage}"
: "${ALPHABET:?set ALPHABET to the alphabet.txt the stores were preprocessed with}"
: "${CHECKPOINT_DIR:?set CHECKPOINT_DIR (shared storage): a requeued job resumes from it}"
VENV=${DSTRAIN_VENV:-$SLURM_SUBMIT_DIR/.venv}
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

args=(--train_files "$TRAIN_FILES" --alphabet_config_path "$ALPHABET" --checkpoint_dir "$CHECKPOINT_DIR")
[ -n "${DEV_FILES:-}" ] && args+=(--dev_files "$DEV_FILES")
[ -n "${TEST_FILES:-}" ] && args+=(--test_files "$TEST_FILES")
[ -n "${EXPORT_DIR:-}" ] && args+=(--export_dir "$EXPORT_DIR")
args+=(--intra_op_parallelism_threads "$OMP_NUM_THREADS")

echo "dstrain: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, $SLURM_NTASKS ranks, $(date -Is)"
if [ "${LAUNCH:-srun}" = mpirun ]; then
  dstrain launch --launcher mpirun -- dstrain train "${args[@]}" "$@"
else
  srun --mpi="${SRUN_MPI:-pmix}" --kill-on-bad-exit=1 --cpu-bind=none dstrain train "${args[@]}" "$@"
fi
rc=$?
if [ "$rc" -eq 75 ] || [ "$rc" -eq 76 ]; then
  # 75: dstrain saved a checkpoint after SIGUSR1 (time limit near) or SIGTERM (preemption). 76: a rank lost a peer
  # (a node died or lost its link) and the others stopped; its last checkpoint is where the requeued job resumes,
  # on the nodes SLURM gives it (not the dead one, which SLURM marks down after SlurmdTimeout).
  echo "dstrain: stopped early (status $rc); requeueing job $SLURM_JOB_ID to resume from $CHECKPOINT_DIR"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "dstrain: finished with status $rc, $(date -Is)"
exit "$rc"
