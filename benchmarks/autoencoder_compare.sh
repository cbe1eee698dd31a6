#!/usr/bin/env bash
# Compare VQ-GAN exports on *training* tiles (model choices are made there; pcam/valid is only monitored):
# paired SSIM / MS-SSIM / PSNR and colour statistics (`evaluate recon`) and FID, precision and recall of the
# reconstructions (benchmarks/fid_curve.py vqgan), on the same seeded N tiles for every export.
#   bash benchmarks/autoencoder_compare.sh OUT SAMPLES=CKPT [SAMPLES=CKPT ...]
#   (N=1000 by default; JOBS=2 runs two exports at once: one process per core)
# SAMPLES is the number of training tiles the export had seen (for the curve). Writes OUT/recon-<SAMPLES>.json,
# OUT/fid-<SAMPLES>.json and OUT/summary.json (one row per export).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1; shift
N=${N:-1000}
JOBS=${JOBS:-2}
DATA=../shared/data/pcam/train
mkdir -p "$OUT"
one() {
  local samples=${1%%=*} ckpt=${1#*=}
  OMP_NUM_THREADS=1 histosynth evaluate recon --tiles $DATA --vqgan "$ckpt" --max-images "$N" --seed 0 \
    --json "$OUT/recon-$samples.json" > "$OUT/recon-$samples.log" 2>&1
  OMP_NUM_THREADS=1 python benchmarks/fid_curve.py vqgan --real $DATA --n "$N" --point "$samples=$ckpt" \
    --json "$OUT/fid-$samples.json" > "$OUT/fid-$samples.log" 2>&1
  echo "done $samples ($ckpt)"
}
export -f one; export OUT N DATA
printf '%s\n' "$@" | xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
python - "$OUT" "$@" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); rows = []
for arg in sys.argv[2:]:
    samples, ckpt = arg.split("=", 1)
    recon = json.loads((out / f"recon-{samples}.json").read_text())
    fid = json.loads((out / f"fid-{samples}.json").read_text())["points"][0]
    rows.append({"samples": int(samples), "checkpoint": ckpt, "fid": fid["fid"], "precision": fid["precision"],
                 "recall": fid["recall"], **{k: recon[k]["mean"] for k in ("ssim", "ms_ssim", "psnr")},
                 "tile_stats": recon["inputs"].get("tile_stats")})
(out / "summary.json").write_text(json.dumps({"real": "../shared/data/pcam/train", "rows": rows}, indent=2))
for r in rows:
    print(json.dumps(r))
PY
