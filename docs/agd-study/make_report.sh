#!/bin/bash
# Regenerate docs/agd-study/report.md and its plots from the committed study runs.
# The results: round 1, issue 19's rows variant, round 2 (those of its sweeps that have runs).
# Left out on purpose: agd-study-recheck and agd-study-gpt2-recheck (issue 19's reruns of
# round-1 runs, compared in the README, not results of their own), and agd-study-timing, which
# only gives idle seconds per token (--timing-runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=docs/agd-study/runs
# The report is made from committed runs only: a run still training (or killed) has no DONE and
# would show as failed. Commit finished runs first, or make the report in a clean clone.
loose=$(git ls-files --others --exclude-standard -- "$runs/*/*/metrics.jsonl" | xargs -r -n1 dirname)
if [ -n "$loose" ]; then
  echo "make_report.sh: run folders not committed (in progress, or finished and not yet committed): $(echo $loose)" >&2
  exit 2
fi
results=()
for sweep in agd-study agd-study-gpt2 agd-study-rows agd-study-gpt2-rows agd-study-r2 agd-study-gpt2-r2 \
             agd-study-arch agd-study-gain agd-study-long agd-study-seed3; do
  [ -d "$runs/$sweep" ] && results+=("$runs/$sweep")
done
timing=()
[ -d "$runs/agd-study-timing" ] && timing=(--timing-runs "$runs/agd-study-timing")
exec agdlm report "${results[@]}" "${timing[@]}" -o docs/agd-study "$@"
