#!/usr/bin/env bash
# One whole GPU visit: install the baselines' wheels, run the correctness check, then the
# benchmark; logs and JSON go to $OUT (default /tmp/gpu_visit). Everything fits one 10-minute
# command: each stage has its own time limit and the benchmark skips what its budget leaves out.
#
#   bash scripts/gpu_visit.sh                                    # full visit
#   CHECK_JOBS="--only ssd --dtypes bf16" BENCH_CASES=ssd bash scripts/gpu_visit.sh
#   CHECK_S=0 BENCH_CASES=cold,lengths,decode,ssd32,block1024 bash scripts/gpu_visit.sh
#
# Budget seen on an H200 (2026-11-28): the parallel check takes ~120 s; mamba_ssm's first call
# compiles and autotunes for ~90 s per head dim, so in one 10-minute call the benchmark gets
# through ceilings, ssd, block and vit; the second line above runs the rest in a second call.
#
# The check runs as parallel processes (one per line of CHECK_JOBS): its time goes mostly to
# compiling kernel variants, which is CPU work, so parallel jobs cut the wall time; the GPU
# work in it is light and its results do not depend on timing. The benchmark runs alone.
#
# The wheels (mamba_ssm without its CUDA build, fla-core) are built here, not on the GPU machine,
# which has no network:
#   MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps --no-build-isolation mamba-ssm -w .whl
#   pip download --no-deps fla-core -d .whl
set -u
OUT=${OUT:-/tmp/gpu_visit}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CHECK_S=${CHECK_S:-150}          # gpu_check time limit (0: skip)
DEFAULT_JOBS="--only ssd --dtypes bf16
--only ssd --dtypes fp32,fp16 --quick
--only conv,rmsnorm,state_update
--only mixer
--only long,block --quick
--only models,decode,compile,launch"
CHECK_JOBS=${CHECK_JOBS:-$DEFAULT_JOBS}
BENCH_S=${BENCH_S:-330}          # bench_block time limit (0: skip)
BENCH_ARGS=${BENCH_ARGS:-}
BENCH_CASES=${BENCH_CASES:-ceilings,ssd,block,profile,vit,cold,lengths,decode,ssd32,block1024}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$CHECK_S" != "0" ]; then
    parts=/tmp/gpu_check_parts
    rm -rf "$parts" && mkdir -p "$parts"
    i=0
    while IFS= read -r job; do
        [ -z "$job" ] && continue
        i=$((i + 1))
        timeout "$CHECK_S" python3 scripts/gpu_check.py --json "$parts/$i.json" $job \
            > "$parts/$i.log" 2>&1 &
    done <<< "$CHECK_JOBS"
    wait
    # one JSON and one log out of the parts
    python3 - "$parts" "$OUT" <<'EOF'
import glob, json, os, sys
parts, out = sys.argv[1], sys.argv[2]
merged = {"jobs": []}
results = []
for path in sorted(glob.glob(os.path.join(parts, "*.json"))):
    d = json.load(open(path))
    merged["env"] = d.get("env")
    merged["jobs"].append({"stage_seconds": d.get("stage_seconds"), "total_seconds": d.get("total_seconds")})
    results += d["results"]
merged["results"] = results
logs = sorted(glob.glob(os.path.join(parts, "*.log")))
done = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(parts, "*.json"))}
merged["unfinished_jobs"] = [os.path.basename(p) for p in logs if os.path.splitext(os.path.basename(p))[0] not in done]
json.dump(merged, open(os.path.join(out, "gpu_check.json"), "w"), indent=1, default=str)
with open(os.path.join(out, "gpu_check.log"), "w") as f:
    for p in logs:
        f.write(f"##### {os.path.basename(p)}\n" + open(p).read())
n_fail = sum(not r["ok"] for r in results)
print(f"=== gpu_check: {len(results) - n_fail} passed, {n_fail} failed; unfinished jobs: {merged['unfinished_jobs']}")
for r in results:
    if not r["ok"]:
        print(f"FAIL {r['op']} {r['dtype']} {r['case']} {r['worst_name']}={r['worst']} {r.get('note', '')[:150]}")
worst = {}
for r in results:
    key = (r["op"], r["dtype"])
    if r["ok"] and (key not in worst or r["worst"] > worst[key][0]):
        worst[key] = (r["worst"], r["worst_name"], r["case"])
for (op, dt), (w, name, case) in sorted(worst.items()):
    print(f"  worst passing {op:<18} {dt:<5} {name}={w:.2e}  ({case[:50]})")
EOF
fi
if [ "$BENCH_S" != "0" ]; then
    timeout "$BENCH_S" python3 scripts/bench_block.py --json "$OUT/bench.json" \
        --cases "$BENCH_CASES" --budget-s $((BENCH_S - 60)) $BENCH_ARGS > "$OUT/bench.log" 2>&1
    echo "bench_block exit $? (log: bench.log)"
    echo "=== bench_block"
    grep -E "^  profile|^    [ 0-9.]+ ms" "$OUT/bench.log" | head -80
    sed -n '/^=====/,$p' "$OUT/bench.log"
    grep -E "Traceback|Error" "$OUT/bench.log" | head -20
fi
