#!/bin/bash
# Issue 27's goal: `ptqkit demo` ends with "advice: none" in 5 of 5 fresh runs, the 5th with a
# second busy process (one core spinning). Run alone, from the repository root:
#     bash bench/demo_runs.sh > bench/DEMO_RUNS.md
# Each run writes its output folder under /tmp/demo_runN and its log to /tmp/demo_runN.log.
echo "# ptqkit demo, 5 runs (the 5th beside a busy process)"
echo
echo "\`bash bench/demo_runs.sh\`, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, commit $(git rev-parse --short HEAD)."
echo
echo '```'
for i in 1 2 3 4 5; do
  busy=""
  if [ "$i" = 5 ]; then python -c "while True: pass" & busy=$!; fi
  echo "=== run $i $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) busy=${busy:+yes}${busy:-no}"
  rm -rf "/tmp/demo_run$i"
  start=$(date +%s.%N)
  python -m ptqkit.cli demo --out "/tmp/demo_run$i" > "/tmp/demo_run$i.log" 2>&1
  echo "rc $? wall $(echo "$(date +%s.%N) - $start" | bc) s"
  grep -E "chosen by ptqkit.tune|^agreement|expected top-1 cost|^advice|\[warning\]" "/tmp/demo_run$i.log"
  [ -n "$busy" ] && kill "$busy"
done
echo '```'
