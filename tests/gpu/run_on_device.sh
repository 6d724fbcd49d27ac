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
# had not compiled chunk_gla forward+backward at gpu1 after 160 s (63 s since the state walk stacks its states
# under the compiler). So each step has its own time limit and writes its
# log under $OUT as it goes; parity suites skip what they cannot start before their --deadline and still report, and
# take FLA's first working kernel configuration (MYFLA_FLA_FIRST_CONFIG=1, tests/gpu/fla_quick.py: correctness does
# not depend on tuning). The benchmark tunes FLA fully, in its own process per group so that each writes its JSON.
# Device time is 30 minutes a session. `parity` runs the suites side by side (Triton compiles on one core per process,
# so they no longer add up), each up to LIMIT seconds (default 500), and fits one 10-minute call. SUITES is a
# comma-separated list of suites, each optionally narrowed by a pytest -k expression, `suite:EXPR`, so that one large
# suite can run as several processes (e.g. SUITES='modules:norms and dtype0,modules:norms and not dtype0,chunk').
# On a machine with several GPUs, run one invocation per GPU side by side (CUDA_VISIBLE_DEVICES=i ... &; wait): they
# install the wheels once between them, and FLA's tuning results, kept on disk by Triton, serve later runs of the
# same kernels on that machine (parity runs neither read nor write them: tests/gpu/fla_quick.py). The device brings
# back only a limited number of files from $OUT: end such a command with `tar czf` of the outputs, e.g.
#   mkdir $OUT/r; OUT=$OUT/r ...; cd $OUT && tar czf r.tgz r && rm -rf r
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
(! command -v flock > /dev/null || flock 9; [ -e /tmp/site/.installed ] || { python3 -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 \
  && touch /tmp/site/.installed; }) 9> /tmp/site.lock || { cat /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
GPU=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi -i "${GPU%%,*}" --query-gpu=index,name,driver_version --format=csv,noheader
END=${END:-$(( $(date +%s) + 100000 ))}   # steps stop by this time (date +%s), so that a caller's archiving still runs
step() { local limit=$1 left=$(( END - $(date +%s) )); shift; (( left < limit )) && limit=$left
         (( limit > 0 )) || { echo "skipped (END reached): $*"; return; }
         echo "+ $*"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$LOG"; echo "rc=${PIPESTATUS[0]}"; }
case "${1:-parity}" in
  parity)   # the suites side by side (Triton compiles on one core per process), one report each; a log for all
    export MYFLA_FLA_FIRST_CONFIG=${MYFLA_FLA_FIRST_CONFIG:-1}
    L=${LIMIT:-500} i=0
    IFS=, read -ra specs <<< "${SUITES:-modules,recurrent,chunk,layer,models}"
    for spec in "${specs[@]}"; do
      s=${spec%%:*} i=$((i + 1)); k=(); name=$s
      [ "$spec" = "$s" ] || { k=(-- -k "${spec#*:}"); name=${s}_$i; }
      (timeout "$L" python3 tests/gpu/parity_report.py --suite $s --no-selfcheck --deadline $(( L - 60 )) \
        --out "$OUT/parity_$name.txt" "${k[@]}" 2>&1 | sed -u "s/^/[$name] /" >> "$OUT/parity.log"
       echo "$name rc=${PIPESTATUS[0]}") &
    done
    [ -n "${NO_SELFCHECK:-}" ] || (timeout "$L" python3 tests/gpu/parity_report.py --no-pytest \
      --out "$OUT/parity_selfcheck.txt" 2>&1 | sed -u "s/^/[self-check] /" >> "$OUT/parity.log"; echo "self-check rc=${PIPESTATUS[0]}") &
    wait
    grep -h 'rows:' "$OUT"/parity_*.txt ;;
  bench)    # PRESET=gpu1|gpu2, BENCH from "ours compiled fla recurrent fla_more" (default "ours fla": compiling alone
    # takes minutes); one process per group, merged afterwards into nbs/bench_results/$PRESET.json by
    # tests/gpu/merge_bench.py. Timings are only comparable from a machine doing nothing else: our eager ops launch
    # many small kernels, and a busy host slowed them 3.3x (chunk_gla fwd+bwd 60 ms against 18 ms, 2026-11-27).
    P=${PRESET:-gpu1}; B="python3 -m myfla_gla.bench --preset $P"
    for grp in ${BENCH:-ours fla}; do case $grp in
      ours) LOG=$P.log step 150 $B --impl chunk_gla --impl fused_chunk_gla --impl 'GatedLinearAttention (chunk)' \
              --impl 'softmax attention (SDPA, causal)' --json "$OUT/${P}_ours.json" ;;
      recurrent) LOG=$P.log step 150 $B --impl fused_recurrent_gla --impl naive_recurrent_gla \
              --json "$OUT/${P}_recurrent.json" ;;
      fla) LOG=$P.log step "${FLA_LIMIT:-300}" $B --impl 'FLA chunk_gla' --json "$OUT/${P}_fla.json" ;;
      fla_more) LOG=$P.log step 200 $B --impl 'FLA fused_recurrent_gla' --impl 'FLA GatedLinearAttention (chunk)' \
              --json "$OUT/${P}_fla_more.json" ;;
      compiled) LOG=$P.log step "${COMPILE_LIMIT:-540}" $B --impl 'chunk_gla (compiled)' --json "$OUT/${P}_compiled.json" ;;
    esac; done ;;
  scaling)  # time and memory against T at the gpu1 shape (FLA tunes once: its keys do not hold T) -> gpu1_scaling.json,
    # saved after each length, so a run cut off by the limit keeps what it measured
    LOG=scaling.log step "${LIMIT:-560}" python3 -m myfla_gla.bench --preset gpu1 --scaling --naive --max-s 3 --budget 3 \
      --json "$OUT/gpu1_scaling.json" --plot "$OUT/gpu1_scaling.png" ;;
  install) ;;   # the wheels only (above)
  notebooks)  # NOTEBOOKS (default: all but the index and the differences) side by side, one process each, taking
    # FLA's first kernel configurations as the parity suites do (untuned, FLA spent over 9 minutes in 06_layer)
    export MYFLA_FLA_FIRST_CONFIG=${MYFLA_FLA_FIRST_CONFIG:-1}
    for n in ${NOTEBOOKS:-$(cd nbs && ls [01]*.ipynb | sed 's/.ipynb$//')}; do
      (timeout "${LIMIT:-500}" python3 tests/gpu/parity_report.py --no-pytest --no-selfcheck --notebooks "$n" \
         --out "$OUT/parity_nb_$n.txt" > "$OUT/notebook_$n.log" 2>&1; echo "$n rc=$?") &
    done; wait ;;
esac
