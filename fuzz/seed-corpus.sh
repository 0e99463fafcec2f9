#!/bin/sh
# Writes fuzz/corpus/inputs/: every config.json of tests/data with a leading 0 byte (the
# config.json parser), a GPU file (1) and a calibration (2). Run from the repository root.
set -e
dir=fuzz/corpus/inputs
mkdir -p "$dir"
i=0
for f in tests/data/configs/*.json tests/data/reference/configs/*.json; do
  [ -f "$f" ] || continue
  { printf '\000'; cat "$f"; } > "$dir/config-$i"
  i=$((i + 1))
done
printf '\001[[gpu]]\nname = "h100"\nhourly_price_usd = 1.5\n\n[[gpu]]\nname = "lab"\nmemory_mib = 49152\nbf16_dense_tflops = 100\n' > "$dir/gpu-0"
printf '\002source = "H200"\ncuda_context_bytes = 500000000\nworkspace_bytes = 67108864\n' > "$dir/cal-0"
echo "$(ls "$dir" | wc -l) seeds in $dir"
