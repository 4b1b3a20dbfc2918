#!/usr/bin/env bash
# One device call: build, GPU tests on 2 and 4 GPUs, benchmarks; everything lands under $OUT.
# Usage (on the GPU machine, repo root): bash bench/device_run.sh [build] [emulated] [newalgos] [partgpu] [onegpu] [emubench] [launch] [pdl] [variants] [phases] [tune] [normtests] [norm] [ncu] [partition] [tests] [faults] [stress] [weave] [trigger] [hf] [grid] [host] [bench] [gemm] [e2e]
# Never touches NCCL_NVLS_ENABLE / TORCH_SYMM_MEM_DISABLE_MULTICAST / NVSHMEM_DISABLE_NVLS.
set -u
OUT=${OUT:-/tmp/tokenweave-out}
# The tree travels without .git: pass TOKENWEAVE_GIT_SHA=$(git rev-parse HEAD) in the command so results name it.
export TOKENWEAVE_GIT_SHA=${TOKENWEAVE_GIT_SHA:-unknown}
mkdir -p "$OUT"
stages=${*:-build tests faults stress weave trigger grid bench gemm e2e}
ngpu=$(nvidia-smi -L | wc -l)
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
log "stages: $stages; GPUs: $ngpu; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
log "env: NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-unset} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-unset} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-unset}"
# Multicast needs 2+ GPUs. Where the host's multicast blockers are not all in force, a multi-GPU run could create
# a multicast object (torch's symmetric-memory rendezvous, NCCL's NVLS, tokenweave's multimem), which can put a
# shared host's GPUs out of service: refuse it. Setting the variables is the host's job, never this script's.
if [ "$ngpu" -ge 2 ] && ! { [ "${NCCL_NVLS_ENABLE:-}" = 0 ] && [ "${TORCH_SYMM_MEM_DISABLE_MULTICAST:-}" = 1 ] &&
                              [ "${NVSHMEM_DISABLE_NVLS:-}" = 1 ]; }; then
  log "REFUSED: $ngpu GPUs but the multicast blockers are not all set (NCCL_NVLS_ENABLE=0," \
      "TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 expected): nothing was run"
  exit 3
fi
has() { case " $stages " in *" $1 "*) return 0;; *) return 1;; esac; }
pytest_run() {  # name, seconds, pytest args...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" python -m pytest -q -p no:cacheprovider "$@" > "$OUT/$name.log" 2>&1
  log "$name: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/$name.log")"
}
vt0=$(date +%s)
if has phases; then  # the lean kernel with its phase timers (bench/debug/variant.sh), built while the main build runs
  MAX_JOBS=6 NVCC_APPEND_FLAGS=-DTOKENWEAVE_PHASE_TIMERS bash bench/debug/variant.sh timers - - build > "$OUT/var_build_timers.log" 2>&1 &
fi
# VARIANTS="name|file|sed expression;...": A/B copies (bench/debug/variant.sh), built in the background now,
# their per-CTA table measured by the variants stage below
if has variants; then
  IFS=';' read -ra specs <<< "${VARIANTS:-}"
  for spec in "${specs[@]}"; do
    IFS='|' read -r vname vfile vsed <<< "$spec"
    MAX_JOBS=6 bash bench/debug/variant.sh "$vname" "$vfile" "$vsed" build > "$OUT/var_build_$vname.log" 2>&1 &
  done
fi
if has build; then
  t0=$(date +%s)
  { which nvcc; echo "CUDA_HOME=${CUDA_HOME:-unset}"; ls -d /usr/local/cuda* ; python -c "import torch, torch.utils.cpp_extension as c; print(torch.__version__, torch.version.cuda, c.CUDA_HOME)"; } > "$OUT/build.log" 2>&1
  TOKENWEAVE_REQUIRE_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-16} python -m pip install -v --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
  log "build: rc=$? in $(( $(date +%s) - t0 )) s; $(grep -m1 '\[tokenweave\]' "$OUT/build.log")"
  python -c "import tokenweave as tw; print('extension:', tw.HAS_EXTENSION)" 2>&1 | tee -a "$OUT/summary.txt"
fi
# One GPU is enough for these: the emulated world runs every protocol with W ranks on one device.
has emulated && pytest_run tests_emulated ${T_EMULATED:-300} -m gpu tests/gpu/test_emulated_gpu.py ${EMULATED_K:+-k "$EMULATED_K"}
# Real process groups (2+ GPUs): the lean / Lamport algorithms and the SM partitions
has newalgos && pytest_run tests_newalgos ${T_NEWALGOS:-200} -m gpu tests/gpu/test_new_algos_gpu.py
has partgpu && pytest_run tests_partition ${T_PARTGPU:-200} -m gpu tests/gpu/test_partition_gpu.py tests/gpu/test_world_one_gpu.py tests/gpu/test_abi_gpu.py tests/gpu/test_tune_gpu.py
has onegpu && pytest_run tests_onegpu ${T_ONEGPU:-200} -m gpu tests/gpu --ignore=tests/gpu/test_emulated_gpu.py
if has emubench; then
  t0=$(date +%s); timeout ${T_EMUBENCH:-240} python bench/emulated_world.py --out-dir bench/results ${EMUBENCH_ARGS:-} > "$OUT/emubench.log" 2>&1
  log "emubench: rc=$? in $(( $(date +%s) - t0 )) s"; tail -25 "$OUT/emubench.log"
fi
has launch && pytest_run tests_launch ${T_LAUNCH:-200} -m gpu tests/gpu/test_launch_gpu.py
if has pdl; then
  t0=$(date +%s); timeout ${T_PDL:-200} python bench/pdl.py --out-dir bench/results ${PDL_ARGS:-} > "$OUT/pdl.log" 2>&1
  log "pdl: rc=$? in $(( $(date +%s) - t0 )) s"; tail -30 "$OUT/pdl.log"
fi
if has variants; then
  wait
  for spec in "${specs[@]}"; do
    IFS='|' read -r vname vfile vsed <<< "$spec"
    log "variant $vname: $(tail -1 "$OUT/var_build_$vname.log")"
    t0=$(date +%s)
    bash bench/debug/variant.sh "$vname" - - run timeout ${T_VARIANT:-150} python bench/emulated_world.py --one-shot-worlds \
      --out-dir /tmp/variants/$vname/results > "$OUT/var_$vname.log" 2>&1
    log "variant $vname emubench: rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "^W=4 ctas=  (1|8) " "$OUT/var_$vname.log"
    mkdir -p bench/results/variants/$vname && cp /tmp/variants/$vname/results/*.json bench/results/variants/$vname/ 2>/dev/null
  done
fi
if has phases; then
  wait
  log "timers build: $(tail -1 "$OUT/var_build_timers.log") in $(( $(date +%s) - vt0 )) s"
  bash bench/debug/variant.sh timers - - run timeout 120 python bench/debug/lean_phases.py --out-dir /tmp/variants/timers/results > "$OUT/lean_phases.log" 2>&1
  rc=$?
  cp /tmp/variants/timers/results/*.json bench/results/ 2>/dev/null
  log "lean phases: rc=$rc"; grep -A4 measured "$OUT/lean_phases.log" | head -12
fi
if has tune; then  # the one-GPU stages of tokenweave-tune ("norm" block shapes, "launch" PDL) into the shipped config
  t0=$(date +%s); card=$(python -c "import tokenweave.tuning as t; print(t.device_slug())" 2>/dev/null || echo h200)
  # up to the norm bench's largest batch (bench/add_rmsnorm.py: 16384; the tune's default stops at 8192, and a
  # choice there was carried to 16384 untimed), with its 15 replays
  timeout ${T_TUNE:-200} tokenweave-tune --no-allreduce --hidden ${TUNE_HIDDEN:-4096 8192} --key world \
    --out tokenweave/configs/$card.json --results-dir bench/results --max-tokens 16384 --replays 15 \
    ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
  log "tune: rc=$? in $(( $(date +%s) - t0 )) s"; tail -15 "$OUT/tune.log"
  cp "tokenweave/configs/$card.json" "$OUT/config-$card.json"  # the tuned config comes back beside the results
fi
has normtests && pytest_run tests_norm ${T_NORMTESTS:-200} -m gpu tests/gpu/test_launch_gpu.py -k "norm"
if has norm; then
  t0=$(date +%s); timeout ${T_NORM:-200} python bench/add_rmsnorm.py --out-dir bench/results ${NORM_ARGS:-} > "$OUT/norm.log" 2>&1
  log "norm: rc=$? in $(( $(date +%s) - t0 )) s"; tail -25 "$OUT/norm.log"
fi
if has ncu; then  # the standalone norm against the compiled one, under Nsight Compute (clocks left alone)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  # NCU_METRICS: a metric list instead of the sections; NORM_PROFILE_SIZES / NORM_PROFILE_SHAPES: bench/debug/norm_profile.py
  what="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis"
  [ -n "${NCU_METRICS:-}" ] && what="--metrics $NCU_METRICS"
  t0=$(date +%s); timeout ${T_NCU:-150} "$NCU" --clock-control none --csv --page details $what \
    -k regex:"add_rmsnorm|triton" python bench/debug/norm_profile.py > "$OUT/ncu_norm.csv" 2> "$OUT/ncu_norm.err"
  log "ncu: rc=$? in $(( $(date +%s) - t0 )) s"
fi
if has partition; then
  t0=$(date +%s); timeout ${T_PARTITION:-200} python bench/partition_costs.py --out-dir bench/results > "$OUT/partition.log" 2>&1
  log "partition: rc=$? in $(( $(date +%s) - t0 )) s"; tail -15 "$OUT/partition.log"
fi
has tests && pytest_run tests_gpu ${T_TESTS:-150} -m gpu tests/gpu/test_ops_gpu.py -k "not grid"
has faults && pytest_run tests_faults ${T_FAULTS:-150} tests/gpu/test_faults_gpu.py -m gpu
has stress && pytest_run tests_stress ${T_STRESS:-300} tests/gpu/test_stress_gpu.py -m gpu
has weave && pytest_run tests_weave ${T_WEAVE:-200} tests/gpu/test_weave_gpu.py -m gpu
# TRIGGER_K: a pytest -k filter for the trigger stage (e.g. "stream" to rerun one consumer's tests)
has trigger && pytest_run tests_trigger ${T_TRIGGER:-300} tests/gpu/test_producer_triton_gpu.py tests/gpu/test_trigger_gpu.py -m gpu ${TRIGGER_K:+-k "$TRIGGER_K"}
has hf && pytest_run tests_hf ${T_HF:-300} tests/gpu/test_weave_gpu.py -m gpu -k hf
has grid && pytest_run tests_grid ${T_GRID:-400} tests/gpu -m gpu -k grid
if has host; then
  timeout 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_ops_gpu.py -k add_rmsnorm 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
  timeout 120 python bench/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log" | tail -6
  log "host overhead: done"
fi
per_tp() {  # name, TP sizes, seconds, command... ending in --tp (each script spawns its own ranks)
  local name=$1 tps=$2 limit=$3; shift 3
  for tp in $tps; do
    [ "$ngpu" -ge "$tp" ] || continue
    local t0=$(date +%s)
    timeout "$limit" "$@" "$tp" > "$OUT/${name}_tp$tp.log" 2>&1
    log "$name tp$tp: rc=$? in $(( $(date +%s) - t0 )) s"
    tail -40 "$OUT/${name}_tp$tp.log"
  done
}
has bench && per_tp bench "${BENCH_TPS:-2 4 8}" "${T_BENCH:-400}" python bench/fused_allreduce_rmsnorm.py --out-dir bench/results ${BENCH_ARGS:-} --tp
has gemm && per_tp gemm "${GEMM_TPS:-2 4 8}" "${T_GEMM:-400}" python bench/gemm_allreduce.py --out-dir bench/results ${GEMM_ARGS:-} --tp
has e2e && per_tp e2e "${E2E_TPS:-2 4 8}" "${T_E2E:-400}" python bench/e2e_layers.py --out-dir bench/results ${E2E_ARGS:-} --tp
tar czf "$OUT/results.tar.gz" bench/results 2>/dev/null
(cd "$OUT" && tar czf logs.tar.gz --remove-files ./*.log 2>/dev/null)  # the device tool returns at most 8 files
cat "$OUT/summary.txt"
