#!/usr/bin/env bash
# `ray job submit -- sdedit run ...` (no --address) through a real Ray job server: starts a
# one-node cluster with its dashboard on loopback, submits the README's example as a job,
# and prints how many more GCS servers run while the job edits than before it (0: the job used
# the cluster; 1: it started a Ray runtime of its own beside it), the job's progress lines, its
# wall time and the `this_run.ray` the run recorded. Needs Ray's job server: `pip install "ray[default]"` in the
# environment whose `ray` and `sdedit` are on PATH (the tests do not install it).
#   bash benchmarks/job_submit.sh [OUT_DIR]
set -uo pipefail
out=${1:-/tmp/sdedit-job-submit}
port=${PORT:-46379}
dashboard=${DASHBOARD_PORT:-48265}
session=$(mktemp -d /tmp/rj-XXXX)  # short: Ray's socket paths must fit 107 bytes
manifest=$(cd "$(dirname "$0")/.." && pwd)/pipeline/examples/manifest.parquet
export RAY_AUTH_MODE=disabled  # a throwaway loopback cluster: no token on either side

setsid ray start --head --block --port "$port" --num-cpus 2 --node-ip-address 127.0.0.1 \
  --include-dashboard=true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" \
  --disable-usage-stats --temp-dir "$session" > "$session.head.log" 2>&1 &
head=$!
stop_head() {
  kill -TERM -"$head" 2>/dev/null; sleep 5; kill -KILL -"$head" 2>/dev/null
  rm -rf "$session" "$session.head.log" "$session.job.log"
}
trap stop_head EXIT
for _ in $(seq 1 60); do
  curl -s -o /dev/null "http://127.0.0.1:$dashboard/api/version" && break
  sleep 1
done
before=$(pgrep -c gcs_server)  # other Ray runtimes on the machine count too: compare
echo "GCS servers before the job: $before"

rm -rf "$out"
log=$session.job.log
started=$(date +%s.%N)
timeout 600 ray job submit --address "http://127.0.0.1:$dashboard" -- \
  sdedit run "$manifest" "$out" --steps 5 > "$log" 2>&1 &
job=$!
for _ in $(seq 1 120); do
  grep -q "SDEdit actor" "$log" && break
  sleep 1
done
sleep 2
echo "GCS servers while the job edits: $(pgrep -c gcs_server) ($(( $(pgrep -c gcs_server) - before )) more)"
wait "$job"
echo "ray job submit: exit $?, $(python3 -c "import time; print(round(time.time() - $started, 1))") s"
grep "sdedit:" "$log"
python3 -c "import json, sys; s = json.load(open(sys.argv[1])); \
print('written', s['written'], 'reconciled', s['reconciled'], 'ray', s['this_run'].get('ray'))" \
  "$out/summary.json"
