#!/usr/bin/env bash
# The prepared GPU check, run from the repository root on a lent H100/H200:
#   (a) correctness: the tiny config's fixed-batch loss and gradient norm on the GPU (bf16 + fused
#       group norm, bf16, float32 at highest precision; bf16 + cuDNN fused attention passed on an H100
#       before) against the CPU's float32 value, computed beside it in a JAX_PLATFORMS=cpu subprocess;
#       3 finite train steps;
#   (b) speed: the paper config at batch 128 on one GPU, lever settings in order of importance
#       (bf16+flat, bf16, fp32, bf16+remat, bf16+fused, bf16+gnfused), each with the sampling step at
#       batch 128 and an operation profile of both steps (idenc_jax/perf/op_profile.py: time by kind of
#       operation and by part of the model, the top operations), MFU against the dense bf16
#       datasheet peak (--peak_flops) with the measured matmul alongside;
#   (c) a warm start: the first variant again in a new process, compiled from the persistent
#       compilation cache the variants of (b) filled;
#   (d) everything into $OUT (check.json, bench.jsonl, bench.json with the warm start, profiles.json,
#       log.txt, env.txt, table.txt, and the first variant's train-step trace) and a table.
# Each part runs under `timeout`, and variants that would start after the deadline are skipped, so
# one hang cannot eat the lease. Everything ends within 580 s of the start: run it with the device
# tool's timeout_s=600. An H100 or H200 compiles the paper config's train step in ~165 s, so after the
# correctness check (~130 s) one variant fits with its sampling step and profile (212 s on the H200 of
# 2026-12-04), two when the same process compiles a second (its compile reuses the first's autotuning).
#
# Dry run on a CPU machine (tiny config everywhere, a few seconds of timing):
#   IDENC_GPU_CHECK_CPU=1 OUT=/tmp/gpu_check bash launch/gpu_check.sh
#
# Wheels: the GPU image has jax, flax (with PyYAML), optax and orbax, but not ml_collections (absl-py may
# or may not be there), which every command line of idenc_jax needs. Download both into .whl/ at the
# repository root (ignored by git) and carry that folder with the run (device tool: carry=[".whl"]):
#   pip download --no-deps --only-binary=:all: -d .whl ml_collections absl-py
# They are installed with `pip install --no-deps` into /tmp/idenc_site; without them the script stops.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One process at a time holds the GPU: let it take most of the memory (batch 128 in float32 is large).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/idenc_site \
    .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/idenc_site"
fi
if ! $PY -c 'import absl.flags, ml_collections.config_flags' >>"$LOG" 2>&1; then
  echo "ml_collections or absl-py is missing: carry their wheels in .whl (see the top of $0)" | tee -a "$LOG"
  exit 1
fi

if [ "${IDENC_GPU_CHECK_CPU:-0}" = 1 ]; then
  BENCH_CONFIG=configs/base.py:tiny; BATCH=16; SAMPLE=8; STEPS=2; WARMUP=1; PEAK=""
  VARIANTS=bf16+gnflax,bf16+gnfused; FAST=--fast_compile   # compile at -O0: the dry run checks the plumbing
  BUDGET=${IDENC_GPU_CHECK_BUDGET:-2400}; CHECK_TIMEOUT=1500; WARM=120
else
  BENCH_CONFIG=configs/base.py:paper; BATCH=128; SAMPLE=128; STEPS=5; WARMUP=3
  PEAK=--peak_flops=989.4e12   # H100/H200 SXM dense bf16 datasheet; the measured matmul is recorded too
  # Measured on an H200 on 2026-12-04: bf16 (twice), bf16+gnfused (0.96x), bf16+fused (one run of its
  # own). Not yet: the flat update beside bf16 in one run, then fp32 and remat.
  VARIANTS=bf16+flat,bf16,fp32,bf16+remat,bf16+fused,bf16+gnfused; FAST=""
  # The check took 124-131 s on that H200 (three tiny-model compiles with autotuning, and the CPU reference).
  BUDGET=${IDENC_GPU_CHECK_BUDGET:-560}; CHECK_TIMEOUT=200; WARM=50
fi
# A follow-up run on a short lease can time other variants and skip the parts already measured:
#   IDENC_GPU_CHECK_VARIANTS=fp32,bf16+remat IDENC_GPU_CHECK_CORRECTNESS=0 IDENC_GPU_CHECK_WARM=0
VARIANTS=${IDENC_GPU_CHECK_VARIANTS:-$VARIANTS}
[ "${IDENC_GPU_CHECK_WARM:-1}" = 0 ] && WARM=0

{
  echo "start $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())" 2>&1
  $PY -c "import ml_collections; print('ml_collections', ml_collections.__file__)" 2>&1 | tail -1
  $PY -c "import absl; print('absl', absl.__file__)" 2>&1 | tail -1
} >"$OUT/env.txt"
cat "$OUT/env.txt"

echo "== (a) correctness, tiny config ($(elapsed) s)"
if [ "${IDENC_GPU_CHECK_CORRECTNESS:-1}" = 0 ]; then echo "skipped (IDENC_GPU_CHECK_CORRECTNESS=0)"; else
# The tiny config defaults to the fused norm (as the cpu one): the reference and the plain variants
# use nn.GroupNorm, bf16+gnfused the fused op.
timeout "$CHECK_TIMEOUT" $PY -m idenc_jax.perf.benchmark --check --config=configs/base.py:tiny \
  --config.model.group_norm=flax --variants=bf16+gnfused,bf16,fp32 --steps=3 $FAST \
  --json_out="$OUT/check.json" 2>>"$LOG" | grep -v '^{'
CHECK_RC=${PIPESTATUS[0]}
[ $CHECK_RC = 0 ] || echo "correctness check exited with $CHECK_RC (see log.txt)"
fi

echo "== (b) speed, $BENCH_CONFIG batch $BATCH ($(elapsed) s)"
PROFILES=/tmp/idenc_gpu_profiles   # deep trace folders stay here; $OUT gets the summaries (at most 8 files back)
rm -rf "$PROFILES"
REMAINING=$(( BUDGET - $(elapsed) ))
# All variants in one process: XLA's autotuning results for the shared convolution shapes carry over
# from one variant's compile to the next (an OOM is an exception there and costs only its variant;
# variants after the first report their executable's memory, the first the device's high-water mark).
# A variant starts if 80% of the longest so far would end by the deadline (later variants reuse the
# autotuning); `timeout` ends a hang or an overrun, and finished variants are already in bench.jsonl.
# The variants compile into a fresh persistent compilation cache, which (c) reads back: WARM seconds of
# the budget are kept for that warm start.
export JAX_COMPILATION_CACHE_DIR=/tmp/idenc_gpu_xla_cache
rm -rf "$JAX_COMPILATION_CACHE_DIR"
timeout $(( REMAINING + 10 - WARM )) $PY -m idenc_jax.perf.benchmark --config="$BENCH_CONFIG" \
  --config.train.batch_size=$BATCH --variants="$VARIANTS" --steps=$STEPS --warmup=$WARMUP \
  --sample_batch=$SAMPLE $PEAK --measure_matmul --isolate=no $FAST --profile_dir="$PROFILES" \
  --deadline=$(( REMAINING - 10 - WARM )) --deadline_fraction=0.8 \
  --records_out="$OUT/bench.jsonl" --json_out="$OUT/bench.json" \
  2>>"$LOG" | tee "$OUT/table.txt" | grep -v '^{'
BENCH_RC=${PIPESTATUS[0]}
[ "$BENCH_RC" = 0 ] || echo "benchmark exited with $BENCH_RC (see log.txt)"

echo "== (c) warm start: the first variant again in a new process, compiled from the cache ($(elapsed) s)"
FIRST=${VARIANTS%%,*}
LEFT=$(( BUDGET - $(elapsed) ))
if [ $WARM = 0 ]; then
  echo "skipped (IDENC_GPU_CHECK_WARM=0)"
elif [ $LEFT -ge 25 ]; then
  timeout $LEFT $PY -m idenc_jax.perf.benchmark --config="$BENCH_CONFIG" --config.train.batch_size=$BATCH \
    --variants="$FIRST" --steps=1 --warmup=0 --sample_batch=$SAMPLE $PEAK --isolate=no $FAST \
    --json_out="$OUT/warm_start.json" 2>>"$LOG" | grep -v '^{'
  echo "warm start exited with ${PIPESTATUS[0]}"
else
  echo "no time left for the warm start ($LEFT s)"
fi

echo "== summary ($(elapsed) s)"
$PY - "$OUT" "$PROFILES" <<'EOF'
import glob, json, os, shutil, sys
out, profiles = sys.argv[1], sys.argv[2]
merged = {}
for path in sorted(glob.glob(os.path.join(profiles, '*', '*_profile.json'))):
  merged.setdefault(os.path.basename(os.path.dirname(path)), {})[os.path.basename(path)[:-5]] = json.load(open(path))
if merged:
  json.dump(merged, open(os.path.join(out, 'profiles.json'), 'w'), indent=1)
  traces = sorted(glob.glob(os.path.join(profiles, '*', 'train_profile_trace', 'plugins', 'profile', '*', '*.trace.json.gz')),
                  key=os.path.getmtime)
  if traces and os.path.getsize(traces[0]) < 15 * 2**20:
    shutil.copy(traces[0], os.path.join(out, 'train_trace_first_variant.json.gz'))
path = os.path.join(out, 'check.json')
if os.path.exists(path):
  c = json.load(open(path))
  print(f"correctness {'PASS' if c['pass'] else 'FAIL'} on {c['device']}: " + ', '.join(
      f"{v} {'ok' if r.get('pass') else 'FAIL'} ({r.get('loss_rel_err', float('nan')):.1e})"
      for v, r in c['variants'].items()))
else:
  print('correctness: no result')
path = os.path.join(out, 'bench.jsonl')
for line in open(path) if os.path.exists(path) else []:
  r = json.loads(line)
  if 'error' in r:
    print(f"{r['variant']:<18} FAILED {r['error'][:80]}")
    continue
  mem = r['peak_memory_bytes'] or 0
  print(f"{r['variant']:<18} {r['train_images_per_s']:8.1f} img/s {r['train_step_ms']:8.1f} ms  "
        f"MFU {100 * (r['mfu'] or 0):5.1f}%  compile {r['compile_s']:5.1f} s  mem {mem / 2**30:5.1f} GiB  "
        f"sample@{r['sample_batch']} {r['sample_step_ms'] or float('nan'):6.1f} ms  "
        f"matmul peak {r.get('matmul_flops_measured') or float('nan'):.3g}")
  for step in ('train_profile', 'sample_profile'):
    p = r.get(step)
    if p and 'error' in p:
      print(f"  {step[:-8]:<6} profile failed: {p['error'][:100]}")
    elif p:
      total = p['op_ms_per_step'] or 1.0
      print(f"  {step[:-8]:<6} ops {p['op_ms_per_step']:7.2f} ms of wall {p['wall_ms_per_step'] or float('nan'):7.2f} ms "
            f"(unmatched {p.get('unmatched_device_ms_per_step') or 0.0:.2f} ms): "
            + ', '.join(f"{k} {100 * v / total:.0f}%" for k, v in p['by_category_ms'].items() if v > 0.005 * total))
# The warm start joins bench.json (at most 8 files come back from a device run).
warm_path, bench_path = os.path.join(out, 'warm_start.json'), os.path.join(out, 'bench.json')
if os.path.exists(warm_path):
  warm = json.load(open(warm_path))
  bench = json.load(open(bench_path)) if os.path.exists(bench_path) else {}
  bench['warm_start'] = warm
  json.dump(bench, open(bench_path, 'w'), indent=1)
  os.remove(warm_path)
  for r in warm.get('variants') or [warm]:
    if 'error' not in r:
      print(f"warm start {r['variant']}: compile {r['compile_s']:.1f} s (from the cache), "
            f"sampling compile {r.get('sample_compile_s') or float('nan'):.1f} s")
EOF
echo "done in $(elapsed) s"
