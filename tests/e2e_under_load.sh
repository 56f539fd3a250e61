#!/bin/bash
# The end-to-end mesh tests N times in a row (default 10) while two busy loops keep both cores
# busy: no test may depend on timing that a loaded machine breaks (issue 12).
#   tests/e2e_under_load.sh [N]        # from the repository root, after `make test` made .venv
cd "$(dirname "$0")/.." || exit 2
runs=${1:-10}
python3 -c "while True: pass" & H1=$!
python3 -c "while True: pass" & H2=$!
trap 'kill $H1 $H2 2>/dev/null' EXIT
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  log=$(mktemp)
  if .venv/bin/python -m pytest -q -p no:cacheprovider tests/mesh/test_mesh_e2e.py > "$log" 2>&1; then
    echo "run $i passed in $(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg): $(tail -1 "$log")"
  else
    echo "run $i FAILED: $(tail -1 "$log") (log: $log)"; exit 1
  fi
  rm -f "$log"
done
