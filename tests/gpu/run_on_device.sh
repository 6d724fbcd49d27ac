#!/usr/bin/env bash
# The CUDA half of every check, and the GPU benchmarks, in device calls of at most 10 minutes each.
# On the lent GPU machine (root of a copy of this repository, FLA's wheels carried in .whl/, see below):
#
#   bash tests/gpu/run_on_device.sh parity   # FLA-parity suites + self-check CUDA rows -> $OUT/parity_report.txt
#   bash tests/gpu/run_on_device.sh bench    # reference shapes against FLA, eager then compiled -> $OUT/gpu*.json
#   bash tests/gpu/run_on_device.sh notebooks  # every notebook's CUDA section (needs the nbdev wheels in .whl/)
#
# Wheels (on the workstation, once): echo /.whl/ >> .git/info/exclude; pip download --no-deps -d .whl
#   fla-core==0.6.0 flash-linear-attention==0.6.0  (+ nbdev==2.4.14 and its pure-Python needs for `notebooks`).
# Lessons of the first attempt (2026-11-27, H100): FLA autotunes every new shape (minutes in all) and Inductor
# compiles for minutes, so a single call that did everything ran out of time with nothing to show. Each step
# here has its own time limit and writes its log under $OUT as it goes.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
step() { local limit=$1; shift; echo "+ $*"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$LOG"; echo "rc=${PIPESTATUS[0]}"; }
case "${1:-parity}" in
  parity)
    LOG=parity.log step 540 python3 tests/gpu/parity_report.py --out "$OUT/parity_report.txt" ;;
  bench)
    LOG=bench.log step 200 python3 -m myfla_gla.bench --preset gpu1 --no-compile --json "$OUT/gpu1.json"
    LOG=bench.log step 150 python3 -m myfla_gla.bench --preset gpu2 --no-compile --json "$OUT/gpu2.json"
    LOG=bench.log step 200 python3 -m myfla_gla.bench --preset gpu1 --impl 'chunk_gla (compiled)' --impl 'FLA chunk_gla' \
      --json "$OUT/gpu1_compiled.json" ;;
  notebooks)
    for nb in nbs/0*.ipynb nbs/1*.ipynb; do LOG=notebooks.log step 120 /tmp/site/bin/nbdev_test --path "$nb"; done ;;
esac
