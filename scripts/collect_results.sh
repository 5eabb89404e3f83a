#!/usr/bin/env bash
# Copy run directories into results/TASK without their checkpoints and TensorBoard events,
# and write the report (table beside the paper's numbers, learning curves) there.
#
#   scripts/collect_results.sh ptb smnist        # runs/ptb-*, runs/smnist-* -> results/
set -euo pipefail
RUNS=${RUNS:-runs}
for task in "$@"; do
  mkdir -p "results/$task"
  found=0
  for run in "$RUNS/$task"-*; do
    [ -f "$run/config.json" ] || continue
    found=1
    dest="results/$task/$(basename "$run")"
    rm -rf "$dest"
    mkdir -p "$dest"
    (cd "$run" && tar cf - --exclude ./checkpoints --exclude ./tensorboard .) | (cd "$dest" && tar xf -)
  done
  if [ "$found" = 1 ]; then
    microcircuits report "results/$task" --out "results/$task" >/dev/null
    echo "results/$task/results.md"
  else
    echo "no runs of $task under $RUNS/" >&2
  fi
done
