#!/usr/bin/env bash
# The CUDA half of every check, and the GPU benchmarks, in device calls of at most 10 minutes each.
# On the lent GPU machine (root of a copy of this repository, FLA's wheels carried in .whl/, see below):
#
#   bash tests/gpu/run_on_device.sh parity   # FLA-parity suites + self-check CUDA rows -> $OUT/parity_*.txt
#   bash tests/gpu/run_on_device.sh bench    # a reference shape against FLA -> $OUT/$PRESET_*.json, which
#                                            # tests/gpu/merge_bench.py joins into nbs/bench_results/$PRESET.json
#   bash tests/gpu/run_on_device.sh scaling  # gpu1 against the sequence length -> $OUT/gpu1_scaling.json (+ .png)
#   bash tests/gpu/run_on_device.sh notebooks  # every notebook's CUDA section (needs the nbdev wheels in .whl/)
#
# Wheels (on the workstation, once): echo /.whl/ >> .git/info/exclude; pip download --no-deps -d .whl
#   fla-core==0.6.0 flash-linear-attention==0.6.0  (+ nbdev==2.4.14 and its pure-Python needs for `notebooks`).
# Measured on fresh H100 machines (2026-11-27): FLA's autotuning took 103 s for its first chunk_gla forward (T=63,
# K=V=64) and 266 s for forward+backward at the gpu1 shape; Triton compiles about ten seconds a kernel variant; Inductor
# had not compiled chunk_gla forward+backward at gpu1 after 160 s. So each step has its own time limit and writes its
# log under $OUT as it goes; parity suites skip what they cannot start before their --deadline and still report, and
# take FLA's first working kernel configuration (MYFLA_FLA_FIRST_CONFIG=1, tests/gpu/fla_quick.py: correctness does
# not depend on tuning). The benchmark tunes FLA fully, in its own process per group so that each writes its JSON.
# Device time is 30 minutes a session. `parity` runs the suites side by side (16 cores: Triton's compiles, one core
# per process, no longer add up), each up to LIMIT seconds (default 500), and fits one 10-minute call.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > /tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step() { local limit=$1; shift; echo "+ $*"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$LOG"; echo "rc=${PIPESTATUS[0]}"; }
case "${1:-parity}" in
  parity)   # the suites side by side (Triton compiles on one core per process), one report each; a log for all
    export MYFLA_FLA_FIRST_CONFIG=${MYFLA_FLA_FIRST_CONFIG:-1}
    L=${LIMIT:-500}
    for s in ${SUITES:-modules recurrent chunk layer models}; do
      (timeout "$L" python3 tests/gpu/parity_report.py --suite $s --no-selfcheck --deadline $(( L - 60 )) \
        --out "$OUT/parity_$s.txt" 2>&1 | sed -u "s/^/[$s] /" >> "$OUT/parity.log"; echo "$s rc=${PIPESTATUS[0]}") &
    done
    [ -n "${NO_SELFCHECK:-}" ] || (timeout "$L" python3 tests/gpu/parity_report.py --no-pytest \
      --out "$OUT/parity_selfcheck.txt" 2>&1 | sed -u "s/^/[self-check] /" >> "$OUT/parity.log"; echo "self-check rc=${PIPESTATUS[0]}") &
    wait
    grep -h 'rows:' "$OUT"/parity_*.txt ;;
  bench)    # PRESET=gpu1|gpu2, BENCH from "ours fla compiled" (default "ours fla": compiling alone takes minutes);
    # one process per group, merged afterwards into nbs/bench_results/$PRESET.json by tests/gpu/merge_bench.py
    P=${PRESET:-gpu1}; B="python3 -m myfla_gla.bench --preset $P"
    for grp in ${BENCH:-ours fla}; do case $grp in
      ours) LOG=bench.log step 130 $B --impl chunk_gla --impl fused_chunk_gla --impl 'GatedLinearAttention (chunk)' \
              --impl 'softmax attention (SDPA, causal)' --json "$OUT/${P}_ours.json" ;;
      fla) LOG=bench.log step 290 $B --impl 'FLA chunk_gla' --json "$OUT/${P}_fla.json" ;;
      compiled) LOG=bench.log step 540 $B --impl 'chunk_gla (compiled)' --json "$OUT/${P}_compiled.json" ;;
    esac; done ;;
  scaling)  # time and memory against T at the gpu1 shape (FLA tunes once: its keys do not hold T) -> gpu1_scaling.json
    LOG=scaling.log step 560 python3 -m myfla_gla.bench --preset gpu1 --scaling --max-s 5 \
      --json "$OUT/gpu1_scaling.json" --plot "$OUT/gpu1_scaling.png" ;;
  notebooks)
    for nb in nbs/0*.ipynb nbs/1*.ipynb; do LOG=notebooks.log step 120 /tmp/site/bin/nbdev_test --path "$nb"; done ;;
esac
