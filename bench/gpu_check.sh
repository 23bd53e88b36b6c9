#!/usr/bin/env bash
# Every GPU figure of issue 17 in one prepared run (a few minutes), on a machine with a CUDA GPU,
# from the repo root with `.gpu/` beside it (made here by `bench/gpu_bundle.py`):
#
#   1. bench/gpu_losses.py at the issue's shapes: mtkd's fused and reference CE / KD, naive CE,
#      Liger's fused linear CE and Cut Cross-Entropy; gpu_kd_vs_liger_ce_step= last;
#   2. the demo's student retrained with `mtkd train --device cuda`, alone and under
#      `torchrun --fsdp` (one rank), against the held-out CE the CPU run reached.
#
# Prints name=value lines (train_<mode>_heldout_ce=, train_<mode>_vs_cpu_ce=); logs go to $OUT
# (the device tool's result folder) or /tmp/gpu-check. DEVICE=cpu QUICK=1 runs the same
# plumbing here on the CPU at toy sizes (that is how CI-less changes to this script are checked).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out"
if ! $py -c "import zarr" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$device" = cpu ] || nvidia-smi -L
losses=(--device "$device")
steps=()
if [ -n "${QUICK:-}" ]; then
  losses+=(--n 256 --h 64 --v 4096 --repeat 1)
  steps=(--steps 4 --eval-every 2)
fi

echo "== bench/gpu_losses.py ${losses[*]}"
timeout "${LOSSES_TIMEOUT:-330}" $py bench/gpu_losses.py "${losses[@]}" 2>&1 \
  | tee "$out/gpu_losses.log" | grep -v "^ *$"

mapfile -t args < <($py -c "import json; print('\n'.join(json.load(open('.gpu/demo/cpu.json'))['args']))")
cpu_ce=$($py -c "import json; print(json.load(open('.gpu/demo/cpu.json'))['heldout_ce'])")
train() {  # mode, extra flag ("" for none), launcher...
  local mode=$1 extra=$2; shift 2
  echo "== mtkd train --device $device ($mode)"
  rm -rf "/tmp/gpu-check-$mode"
  timeout "${TRAIN_TIMEOUT:-150}" "$@" train "${args[@]}" "${steps[@]}" ${extra:+"$extra"} --device "$device" \
    --out "/tmp/gpu-check-$mode" >"$out/train_$mode.log" 2>&1
  echo "train_${mode}_rc=$?"
  grep -a "held-out" "$out/train_$mode.log" | tail -1
  $py - "$mode" "$cpu_ce" "/tmp/gpu-check-$mode" <<'EOF'
import json, sys
from pathlib import Path
mode, cpu_ce, run = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
final = run / "final_metrics.json"
if final.exists():
    ce = json.loads(final.read_text())["heldout_ce"]
    print(f"train_{mode}_heldout_ce={ce:.4f}")
    print(f"train_{mode}_vs_cpu_ce={ce - cpu_ce:+.4f}  (cpu {cpu_ce:.4f})")
EOF
}
train alone "" $py -m mtkd
train fsdp --fsdp $py -m torch.distributed.run --standalone --nproc-per-node 1 -m mtkd
grep -a "^gpu_\|^method\." "$out/gpu_losses.log"
