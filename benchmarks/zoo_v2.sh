#!/usr/bin/env bash
# Zoo v2: backdoored CIFAR-10 WRN-16-1 models trained the way the papers' are (ABL's README recipe:
# 60 epochs, SGD lr 0.1 -> 0.01 at epoch 40, batch 128, crop + flip; wd 5e-4), fp32.
# Resumable: run it again after an interruption; finished folders are skipped.
# Usage: benchmarks/zoo_v2.sh DATA_DIR OUT_DIR [name ...]
set -uo pipefail
DATA=${1:?data dir}; OUT=${2:?out dir}; shift 2
RECIPE=(--epochs 60 --batch-size 128 --lr 0.1 --weight-decay 5e-4 --schedule multistep --milestones 40
        --gamma 0.1 --channels-last --no-epoch-eval)
declare -A ARGS=(
  [clean]="--attack badnets --rate 0"
  [badnets]="--attack badnets"
  [blend]="--attack blend"
  [trojan]="--attack trojan"
  [sig]="--attack sig"
  [wanet]="--attack wanet"
  [clean-seed1]="--attack badnets --rate 0 --seed 1"
  [badnets-seed1]="--attack badnets --seed 1"
  [clean-label]="--attack clean-label --corners four-corners"
)
NAMES=("$@"); [ ${#NAMES[@]} -eq 0 ] && NAMES=(clean badnets blend trojan sig wanet clean-seed1 badnets-seed1 clean-label)
for name in "${NAMES[@]}"; do
  [ -f "$OUT/$name/metrics.json" ] && { echo "$name: done"; continue; }
  echo "$name: training ($(date +%T))"
  # shellcheck disable=SC2086
  backdoor-eraser attack --dataset cifar10 --data-dir "$DATA" --arch wrn-16-1 ${ARGS[$name]} \
      "${RECIPE[@]}" --out "$OUT/$name" --resume || echo "$name: FAILED"
done
