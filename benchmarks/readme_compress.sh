#!/usr/bin/env bash
# The compressions behind the README table: CoMe default and faithful at about
# 10/20/30% of parameters, on the C4 calibration of the reference fixture.
set -euo pipefail
CALIB=${CALIB:-../shared/fixtures/come_reference/calib_tokens.safetensors}
for r in 0.1 0.2 0.3; do
  for mode in default faithful; do
    flag=""; [ "$mode" = faithful ] && flag="--faithful"
    out="out/come-$mode-$r"
    [ -f "$out/config.json" ] && continue
    /usr/bin/time -f "%e s wall" come-fast compress --model smollm2-135m --ratio "$r" $flag --calib "$CALIB" --out "$out" --quiet --threads 2
  done
done
