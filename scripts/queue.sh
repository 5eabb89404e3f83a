#!/usr/bin/env bash
# Train several runs one after the other, each resumed from its last checkpoint if it
# was started before (a run that already finished only re-evaluates its best checkpoint).
#
#   scripts/queue.sh "ptb lstm 10" "ptb sublstm 10" "smnist fix_sublstm 100 --epochs 4"
#
# Each argument is "TASK CELL SIZE [more microcircuits train options]". Runs go to
# $OUT (default runs/), one thread each ($THREADS, default 1), logs to $OUT/NAME.log.
# Start it with nohup ... & for long runs; kill it and start it again to continue.
#
# Runs that outlive their machine: a run not yet in $OUT whose resumable state is
# committed under $RESULTS/TASK/NAME (default results/; see collect_results.sh) is
# copied from there first, so on a fresh clone the same command continues it where
# the last machine stopped. A run committed as finished (results.json, best weights
# only) is not trained again.
set -euo pipefail
OUT=${OUT:-runs}
RESULTS=${RESULTS:-results}
THREADS=${THREADS:-1}
mkdir -p "$OUT"
for spec in "$@"; do
  read -r task cell size rest <<<"$spec"
  name="$task-$cell-$size-seed0"
  committed="$RESULTS/$task/$name"
  if [ ! -f "$OUT/$name/config.json" ] && [ -f "$committed/config.json" ]; then
    if [ -f "$committed/checkpoints/last.safetensors" ]; then
      echo "$(date -Is) continue $committed (committed state) in $OUT/$name"
      mkdir -p "$OUT/$name"
      cp -R "$committed/." "$OUT/$name/"
    elif [ -f "$committed/results.json" ]; then
      echo "$(date -Is) skip $name: finished, see $committed"
      continue
    fi
  fi
  echo "$(date -Is) start $OUT/$name $rest"
  # shellcheck disable=SC2086  # $rest holds further options, split on purpose
  if microcircuits train "$task" --cell "$cell" --size "$size" --threads "$THREADS" \
      --no-progress --out "$OUT" --resume $rest >>"$OUT/$name.log" 2>&1; then
    echo "$(date -Is) end $OUT/$name"
  else
    status=$?
    echo "$(date -Is) failed $OUT/$name (exit $status): see $OUT/$name.log"
  fi
done
