#!/usr/bin/env bash
# Copy run directories into results/TASK, with what lets them outlive this machine, and
# write the report (table beside the paper's numbers, learning curves) there.
#
#   scripts/collect_results.sh ptb smnist        # runs/ptb-*, runs/smnist-* -> results/
#
# A run that ended (all its epochs, or early stopping) keeps its best weights (checkpoints/best.safetensors,
# for `microcircuits figure`, `report` and `load_run`); one still under way (or paused after `--epochs k`) also keeps its
# resumable state (checkpoints/last.safetensors: weights, optimiser, RNG, data
# position), from which scripts/queue.sh continues it on another machine. Each copy
# replaces the one before; TensorBoard events and old-format .pt files stay behind.
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
    keep=(best)
    # shellcheck disable=SC2016
    python -c 'import sys; from microcircuits.report import summarize_run as s
sys.exit(0 if s(sys.argv[1]).ended else 1)' "$run" || keep+=(last)
    for checkpoint in "${keep[@]}"; do
      if [ -f "$run/checkpoints/$checkpoint.safetensors" ]; then
        mkdir -p "$dest/checkpoints"
        cp "$run/checkpoints/$checkpoint.safetensors" "$dest/checkpoints/"
      fi
    done
  done
  if [ "$found" = 1 ]; then
    microcircuits report "results/$task" --out "results/$task" >/dev/null
    echo "results/$task/results.md"
  else
    echo "no runs of $task under $RUNS/" >&2
  fi
done
