#!/usr/bin/env bash
# The measured results of weights/pcam96/MODEL_CARD.md, from the shipped bundle and its training artefacts.
#   bash benchmarks/pcam96_eval.sh [OUT]        (default OUT=runs/pcam96/eval; needs ../shared/data and
#                                               `pip install -e ".[metrics]"` for the Inception network)
# Writes JSON per metric into OUT; nothing here reads the validation tiles to choose anything.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pcam96/eval}
B=weights/pcam96
T=$B/training
DATA=../shared/data/pcam
mkdir -p "$OUT"
machine="$(uname -m), $(nproc) CPU cores, $(python -c 'import torch; print("torch", torch.__version__)')"
echo "machine: $machine" | tee "$OUT/machine.txt"

# 1. Realism: 2,907 generated tiles (class proportions of the training clusters) vs the 2,907 validation tiles,
#    and the real-vs-real floor: 2,907 training tiles vs the same validation tiles.
python - "$T/label_map.yaml" "$OUT/eval-recipe.yaml" <<'EOF'
import sys, yaml
label_map = yaml.safe_load(open(sys.argv[1]))
weights = {c["name"]: int(c["tiles"]) for c in label_map["classes"]}
recipe = {"bundle": "../../../weights/pcam96", "seed": 12345, "batch_size": 64,
          "proportions": {"total": 2907, "weights": weights}, "sampler": {"name": "dpmpp2m", "steps": 20}}
yaml.safe_dump(recipe, open(sys.argv[2], "w"), sort_keys=False)
EOF
/usr/bin/time -f "%e s" -o "$OUT/generate_time.txt" \
  histosynth generate --recipe "$OUT/eval-recipe.yaml" --out "$OUT/generated" --backend auto
histosynth evaluate fid --real $DATA/valid --fake "$OUT/generated" --json "$OUT/fid.json"
[ -f "$OUT/fid_floor.json" ] || \
  histosynth evaluate fid --real $DATA/valid --fake $DATA/train --max-images 2907 --json "$OUT/fid_floor.json"

# 2. Reconstruction (the paper's paired metrics) on the validation tiles: VQ-GAN encoder + the shipped decoder.
histosynth evaluate recon --tiles $DATA/valid --vqgan "$T/vqgan.safetensors" --bundle $B --json "$OUT/recon.json"

# 3. Controllability: 100 tiles per class, assigned back by the model's own cluster head.
cat > "$OUT/control-recipe.yaml" <<EOF
bundle: ../../../weights/pcam96
seed: 777
batch_size: 50
balanced: {per_class: 100}
sampler: {name: dpmpp2m, steps: 20}
EOF
histosynth generate --recipe "$OUT/control-recipe.yaml" --out "$OUT/control-samples"
histosynth evaluate control --samples "$OUT/control-samples" --vqgan "$T/vqgan.safetensors" \
  --head "$T/imc_head.safetensors" --labels "$T/label_map.yaml" --png "$OUT/control.png" --json "$OUT/control.json"

# 4. Downstream utility: tumour-vs-normal classifier on real subsets, with and without synthetic tiles.
if [ -f "$T/class_to_label.yaml" ]; then
  histosynth evaluate downstream --real $DATA/train --real-labels $DATA/train_labels.csv \
    --test $DATA/valid --test-labels $DATA/valid_labels.csv --synthetic "$OUT/generated" \
    --class-map "$T/class_to_label.yaml" --sizes 50,200,800 --seeds 3 --png "$OUT/downstream.png" \
    --json "$OUT/downstream.json"
fi
echo "results in $OUT"
