#!/usr/bin/env bash
# Real-data runs behind the results table in docs/results/real-data.md (CPU settings).
# Usage: bash studies/real_data.sh [bottle|magnetic_tile|teacher_ablation] [OUT]
# Reads $EDGESTAD_DATA (default ../shared/data). Each run: train a bundle, evaluate it, copy the
# metrics into studies/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EDGESTAD_DATA:-../shared/data}
WHAT=${1:-bottle}
OUT=${2:-runs}
EPOCHS=${EPOCHS:-8}
CROP=${CROP:-128}
STRIDE=${STRIDE:-2}
EDGESTAD=${EDGESTAD:-.venv/bin/edgestad}
mkdir -p "$OUT" studies/results

run() {   # name dataset [train options...]
  local name=$1 data=$2; shift 2
  /usr/bin/time -v "$EDGESTAD" train "$data" --out "$OUT/$name" --epochs "$EPOCHS" \
      --crop-size "$CROP" --dense-stride "$STRIDE" --device cpu "$@" 2> "$OUT/$name.time.txt"
  "$EDGESTAD" evaluate "$OUT/$name" "$data" --out "$OUT/${name}_eval"
  cp "$OUT/${name}_eval/metrics.json" "studies/results/${name}_metrics.json"
  cp "$OUT/${name}_eval/per_defect_type.md" "studies/results/${name}_per_defect_type.md"
  cp "$OUT/${name}_eval/pro_curve.png" "studies/results/${name}_pro_curve.png"
  python3 - "$OUT/$name/manifest.json" "studies/results/${name}_training.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
json.dump({"method_config": m["method_config"], "training": m["provenance"]["training"],
           "teachers": m["provenance"]["teachers"], "images": m["provenance"]["images"],
           "thresholds": m["thresholds"]}, open(sys.argv[2], "w"), indent=2)
PY
}

case "$WHAT" in
  bottle)        run bottle "$DATA/mvtec_ad/bottle" -p 17 -p 33 -p 65 ;;
  magnetic_tile) run magnetic_tile "$DATA/magnetic_tile/magnetic_tile" -p 17 -p 33 -p 65 ;;
  teacher_ablation)
    # p=65 students on a teacher trained 10x fewer iterations than the shipped one; compare with
    # the p65 row of the bottle run (scales train independently: same students, same settings).
    run bottle_p65_weak "$DATA/mvtec_ad/bottle" -p 65 --teacher "${WEAK_TEACHER:?set WEAK_TEACHER}" ;;
  *) echo "unknown run $WHAT" >&2; exit 2 ;;
esac
