#!/usr/bin/env bash
# The README's main job: synthetic data (once), training on CPU, then evaluation of the final checkpoint.
#   projects/home/recap/run_local.sh [dotted.key=value overrides...]
set -euo pipefail
cd "$(dirname "$0")/../../.."
export TML_DATA=${TML_DATA:-$PWD/data} TML_RUNS=${TML_RUNS:-$PWD/runs}
CONFIG=projects/home/recap/config/local.yaml
BIN=.venv/bin
if [ ! -f "$TML_DATA/local/train/oracle_auc.json" ]; then
  "$BIN/tml-recap" generate-data --config "$CONFIG" --num-examples 2000000 --output "$TML_DATA/local" \
    --validation-fraction 0.1
fi
"$BIN/tml-recap" train --config "$CONFIG" "$@"
"$BIN/tml-recap" evaluate --config "$CONFIG" "$@"
echo "oracle AUC of the generator (the best any model can do):"
cat "$TML_DATA/local/valid/oracle_auc.json"; echo
