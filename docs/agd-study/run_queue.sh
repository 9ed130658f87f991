#!/bin/bash
# Runs the AGD study's sweeps in the README's queue order, one run at a time, resumable: each
# pass runs the first sweep that still has runs to do, then looks again from the top, so a
# sweep file widened by a rule (an lr added to every cell) is picked up before later sweeps.
# Stop it with `kill -- -<pgid>`; pause it for tests and benchmarks with `kill -STOP -- -<pgid>`
# and `kill -CONT -- -<pgid>`. Commit each ended run's config.yaml, metrics.jsonl, DONE or
# DIVERGED, and timing.json (checkpoints/ and provenance.json stay out of git).
set -uo pipefail
cd "$(dirname "$0")/../.."
# An entry is a sweep, or sweep:regex for the runs of it whose name matches. The cheap depth
# cells (both seeds), the gain curves and any third seeds go before width 384, which is most
# of the hours, so whole cells land first.
QUEUE=(agd-study-timing agd-study-r2 agd-study-long agd-study-gpt2-r2 'agd-study-arch:-d[28]-w128-'
       agd-study-gain)
[ -f configs/sweeps/agd-study-seed3.yaml ] && QUEUE+=(agd-study-seed3)
QUEUE+=(agd-study-arch)
out=docs/agd-study/runs
while true; do
  next=()
  for entry in "${QUEUE[@]}"; do
    sweep=${entry%%:*}
    only=(); [ "$entry" != "$sweep" ] && only=("--only=${entry#*:}")
    # A listing that fails (agdlm not installed, a bad sweep file) must stop the queue, not
    # read as "nothing to do".
    listing=$(agdlm sweep "$sweep" --out-dir "$out" --list "${only[@]}") \
      || { echo "agdlm sweep $entry --list failed; queue stopped"; exit 1; }
    grep -q '^  todo' <<< "$listing" && { next=("$sweep" "${only[@]}"); break; }
  done
  [ -z "${next[*]}" ] && { echo "every run of the queue is finished"; exit 0; }
  echo "=== ${next[*]} $(date -u +%FT%TZ)"
  agdlm sweep "${next[@]}" --out-dir "$out" || { echo "agdlm sweep ${next[*]} failed"; exit 1; }
done
