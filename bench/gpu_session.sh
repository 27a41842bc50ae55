#!/usr/bin/env bash
# Everything a lent GPU should run, in one call that fits a 10-minute command limit:
#   the GPU tests, the real-model sizes (issue 15), the launch-bound latency rows, the bandwidth
#   and graph rows, and the switch rows (issue 18). Each step has its own time limit, writes its
#   whole log under $OUT (or ./gpu-logs), and the summary table comes last (a reply carries the
#   end of the output). Run it from the repository root:
#       bash bench/gpu_session.sh            # on the GPU machine
#       GPUCTX_SESSION_STEPS=tests bash bench/gpu_session.sh   # some steps only
# Carried wheels (decorator, IPython, diffusers: the device's README says how) are installed
# from .whl/ when that folder exists. On a machine without CUDA every step says so and fails,
# which is how this script is tried on the CPU before device time is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
STEPS=${GPUCTX_SESSION_STEPS:-"probe tests models latency bandwidth switch"}
summary=()

step() {   # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")")
}

step probe 60 $PY -c "import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0)); sys.exit(0 if torch.cuda.is_available() else 1)"
step tests 170 $PY -m pytest -q -p no:cacheprovider tests/gpu -x
step models 150 $PY bench/gpu_models.py
step latency 70 $PY bench/gpu_latency.py
step bandwidth 90 $PY bench/gpu.py --quick
step switch 90 $PY bench/gpu.py --switch

for name in probe tests models latency bandwidth switch; do
  [ -f "$OUT/$name.log" ] && { echo "===== $name (last 25 lines)"; tail -n 25 "$OUT/$name.log"; }
done
echo "===== summary (logs in $OUT/)"
printf '%s\n' "${summary[@]}"
