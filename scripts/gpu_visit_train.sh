#!/usr/bin/env bash
# One GPU visit for the training issues (#4, #6, #7) on one or two GPUs: each stage is one
# word of STAGES, and each writes its log and JSON under $OUT, packed at the end into
# $OUT/visit.tgz (the device tool returns at most 8 files; NO_PACK=1 keeps them loose).
#
#   STAGES="check train" bash scripts/gpu_visit_train.sh     # gpu_check on GPU 1 beside bench_train on GPU 0
#   STAGES="multigpu" bash scripts/gpu_visit_train.sh        # bench_multigpu over both GPUs
#   STAGES="multigpu train" ...                                  # then bench_train on GPU 0
#   STAGES="pytest multigpu" PYTEST_ARGS="tests/test_fsdp_cpu.py" ...  # CPU tests beside the GPU stages
#   STAGES="block tune" BLOCK_ARGS="--cases ssd,block,vit" ...  # bench_block alone, then tune_ssd
#   STAGES="conv" CONV_ARGS="--variants 32x128x4,64x64x4" ...  # the conv1d's launch variants
#   STAGES="host check" ...                                # where an eager SSD call's host time goes
#       (scripts/host_profile.py HOST_ARGS), then gpu_check
#   BLOCK_ARGS="--cases block --no-baseline" STAGES="check train" ...  # bench_block before bench_train
#   TRAIN_ARGS=$'--cases lm_130m --compile off,on\n--cases vision_b16'  # one bench_train run per line
#   STAGES="check tune" TUNE_ARGS="--shapes block" ...   # gpu_check on GPU 1, SSD launch options on GPU 0
#       (TUNE_ARGS=$'--shapes block\nMATMAMBA_SSD_CHUNK=32 --shapes block': one run a line, each with
#       its leading NAME=value words as its environment)
#   STAGES="tune ncu" ...                                  # tune_ssd on GPU 0 beside Nsight Compute on GPU 1:
#       NCU_CMDS (one command per line) run under ncu, counters of the kernels matching NCU_KERNELS
#       (launches NCU_SKIP.. NCU_SKIP+NCU_COUNT-1), summarised by scripts/ncu_summary.py
#   STAGES="ncu" NCU_GPU=0 NCU_CMDS="python3 scripts/profile_block.py --widths 768 --plain-run 4" \
#       NCU_KERNELS="_conv_bwd_du_kernel|_conv_bwd_dx_kernel|_rmsnorm_bwd_kernel" NCU_SKIP=6 NCU_COUNT=6 ...
#       # the block's conv and norm backwards: their time, occupancy and bytes against their floors
#   STAGES="profile ab" AB_TREE=.ab_old bash scripts/gpu_visit_train.sh   # GPU vs host time of the block
#       (scripts/profile_block.py), then the block timed from an older tree and from this one,
#       alternately, in one call (same machine): prepare the old tree here with
#       mkdir .ab_old && git archive <rev> | tar -x -C .ab_old && echo /.ab_old/ >> .git/info/exclude
#       and name .ab_old in the call's carry. AB_ARGS (default "--cases block") picks bench_block's
#       cases for both trees, AB_TIMEOUT (default 150 s) limits each run, AB_ROUNDS (default 2)
#       is how many times each tree runs.
#
# Autotuning results (mamba_ssm's kernels autotune for ~2 minutes on their first call) are kept
# between visits: each visit leaves $OUT/autotune.tgz (Triton's *.autotune.json files); copy it to
# .tcache/autotune.tgz here and name .tcache in the next call's carry.
#
# Wheels the GPU image lacks (hydra-core, omegaconf, antlr4; mamba_ssm for the baselines) are
# carried in .whl/: bash ../shared/tools/gpu_wheels.sh, plus the mamba_ssm wheel (see gpu_visit.sh).
set -u
OUT=${OUT:-/tmp/gpu_visit_train}
mkdir -p "$OUT"
# a warm machine keeps /tmp between calls: no gpu_check parts from an earlier call in this summary
rm -rf /tmp/check_parts
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
[ -f .tcache/autotune.tgz ] && tar xzf .tcache/autotune.tgz -C "$TRITON_CACHE_DIR"
# Never use NVLink multicast on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STAGES=${STAGES:-"check train"}
TRAIN_ARGS=${TRAIN_ARGS:-"--cases lm_130m,lm_130m:768,vision_35m --data synthetic,real --compile off --steps 15 --warmup 5 --time-budget 330"}
MULTI_ARGS=${MULTI_ARGS:-"--time-budget 380"}
CHECK_JOBS=${CHECK_JOBS:-"--only compile,decode
--only mixer,block --quick"}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{
    nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,memory.used --format=csv
    python3 -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
    df -h /dev/shm /tmp | tail -2; nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# run_each_line SCRIPT TAG TIMEOUT LINES: SCRIPT on GPU 0 once per line of LINES (the first line
# even when empty: the script's defaults), a line's leading NAME=value words its environment;
# run i writes $OUT/TAG[_i].{cmd,json,log}.
run_each_line() {
    local script=$1 tag=$2 limit=$3 i=0 line word run_tag envs args
    while IFS= read -r line; do
        i=$((i + 1))
        [ $i -gt 1 ] && [ -z "$line" ] && continue
        envs=(); args=()
        for word in $line; do
            if [ ${#args[@]} = 0 ] && [[ $word =~ ^[A-Z_][A-Z0-9_]*= ]]; then envs+=("$word"); else args+=("$word"); fi
        done
        run_tag=$([ $i = 1 ] && echo "$tag" || echo "${tag}_$i")
        echo "${envs[*]} ${args[*]}" > "$OUT/$run_tag.cmd"
        CUDA_VISIBLE_DEVICES=0 env "${envs[@]}" timeout "$limit" python3 "$script" \
            "${args[@]}" --json "$OUT/$run_tag.json" > "$OUT/$run_tag.log" 2>&1
    done <<< "$4"
}

# With two GPUs the stages marked "beside" run side by side (GPU 0 and GPU 1); with one GPU every
# stage runs on GPU 0, one after another, so no timing shares the chip with another stage.
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${NGPU:-0}" -ge 2 ]; then GPU1=1; else GPU1=0; fi
pids=()
cpu_pids=()
serialize() { if [ "$GPU1" = 0 ] && [ ${#pids[@]} -gt 0 ]; then wait "${pids[@]}"; pids=(); fi; }
for stage in $STAGES; do
    case $stage in
    check)   # correctness of this visit's kernel code, on the second GPU, in parallel jobs; then
             # (GPU1_TRAIN_ARGS) one bench_train run on that GPU once they are done
        mkdir -p /tmp/check_parts
        (
            jobs_=()
            i=0
            while IFS= read -r job; do
                [ -z "$job" ] && continue
                i=$((i + 1))
                CUDA_VISIBLE_DEVICES=$GPU1 timeout ${CHECK_TIMEOUT:-300} python3 scripts/gpu_check.py --json /tmp/check_parts/$i.json $job \
                    > /tmp/check_parts/$i.log 2>&1 &
                jobs_+=($!)
            done <<< "$CHECK_JOBS"
            wait "${jobs_[@]}"
            if [ -n "${GPU1_TRAIN_ARGS:-}" ]; then
                CUDA_VISIBLE_DEVICES=$GPU1 timeout ${GPU1_TRAIN_TIMEOUT:-300} python3 scripts/bench_train.py $GPU1_TRAIN_ARGS \
                    --json "$OUT/bench_train_gpu1.json" > "$OUT/bench_train_gpu1.log" 2>&1
            fi
        ) &
        pids+=($!)
        ;;
    train)   # on GPU 0: optionally the block benchmark first (BLOCK_ARGS, one line), then bench_train
        (
            if [ -n "${BLOCK_ARGS:-}" ]; then
                CUDA_VISIBLE_DEVICES=0 timeout ${BLOCK_TIMEOUT:-200} python3 scripts/bench_block.py $BLOCK_ARGS \
                    --json "$OUT/bench_block.json" > "$OUT/bench_block.log" 2>&1
            fi
            # one bench_train run per line of TRAIN_ARGS (a case list, flags and overrides each)
            i=0
            while IFS= read -r args; do
                [ -z "$args" ] && continue
                i=$((i + 1))
                tag=$([ $i = 1 ] && echo bench_train || echo bench_train_$i)
                CUDA_VISIBLE_DEVICES=0 timeout ${TRAIN_TIMEOUT:-540} python3 scripts/bench_train.py $args \
                    --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
            done <<< "$TRAIN_ARGS"
        ) &
        pids+=($!)
        ;;
    multigpu)  # both GPUs, in the foreground, after the stages before it: the ones after start when it is done
        [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
        pids=()
        timeout ${MULTI_TIMEOUT:-560} python3 scripts/bench_multigpu.py --gpus 2 --work-dir /tmp/bmg \
            --json "$OUT/bench_multigpu.json" --markdown "$OUT/bench_multigpu.md" \
            --artifacts "$OUT/bench_multigpu" $MULTI_ARGS > "$OUT/bench_multigpu.log" 2>&1
        ;;
    profile) # GPU time vs host time of the block per width (scripts/profile_block.py), on GPU 0;
             # also for AB_TREE when set (same tree layout, its own matmamba package), and for each
             # of PROFILE_VARIANTS (profile_block.py --variant) on this tree; PROFILE_ARGS (e.g.
             # "--widths 768,96 --top 30") go to every run
        for tree in ${AB_TREE:-} .; do
            tag=$([ "$tree" = . ] && echo new || echo old)
            CUDA_VISIBLE_DEVICES=0 timeout 200 python3 scripts/profile_block.py --repo "$tree" ${PROFILE_ARGS:-} \
                --json "$OUT/profile_$tag.json" > "$OUT/profile_$tag.log" 2>&1
            echo "=== profile, $tag tree ($tree)"; grep -E "^width" "$OUT/profile_$tag.log"
        done
        for variant in ${PROFILE_VARIANTS:-}; do
            CUDA_VISIBLE_DEVICES=0 timeout 200 python3 scripts/profile_block.py --variant "$variant" ${PROFILE_ARGS:-} \
                --json "$OUT/profile_$variant.json" > "$OUT/profile_$variant.log" 2>&1
            echo "=== profile, variant $variant"; grep -E "^width" "$OUT/profile_$variant.log"
        done
        ;;
    tune)    # launch options of the SSD kernels (scripts/tune_ssd.py) on GPU 0, beside the stages on
             # GPU 1: one run per line of TUNE_ARGS; a line's leading NAME=value words are that
             # run's environment (e.g. MATMAMBA_SSD_CHUNK=32 --shapes block)
        run_each_line scripts/tune_ssd.py tune_ssd "${TUNE_TIMEOUT:-560}" "${TUNE_ARGS:-}" &
        pids+=($!)
        ;;
    ncu)     # Nsight Compute on NCU_GPU (default 1), in the foreground: each line of NCU_CMDS
             # under ncu with the clocks and caches left as they are (what the program sees), the
             # SpeedOfLight, Occupancy, memory, scheduler and warp-state sections of the kernels
             # matching NCU_KERNELS, the per-reason stall counters (why no warp could issue) and the
             # bytes moved (DRAM, L2 sectors); one CSV per command, then one table
             # (scripts/ncu_summary.py)
        ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        i=0
        while IFS= read -r cmd; do
            [ -z "$cmd" ] && continue
            i=$((i + 1))
            echo "$cmd" > "$OUT/ncu_$i.cmd"
            # the stall counters and the bytes each kernel moves (DRAM read / written, L2 sectors
            # read / written from L1: against the bytes the kernel needs, what partial sectors and
            # re-reads cost); if this ncu refuses them, again with the byte counters only, then
            # with the sections alone
            refused=0
            bytes_metrics="dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_write.sum"
            for metrics in "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,$bytes_metrics" \
                    "$bytes_metrics" ""; do
                extra=()
                [ -n "$metrics" ] && extra=(--metrics "$metrics")
                CUDA_VISIBLE_DEVICES=${NCU_GPU:-$GPU1} timeout ${NCU_TIMEOUT:-240} "${ncu_bin:-ncu}" \
                    --clock-control none --cache-control none \
                    --kernel-name "regex:${NCU_KERNELS:-_chunk_bwd_dx_kernel|_chunk_bwd_dbdc_kernel}" \
                    --launch-skip ${NCU_SKIP:-3} --launch-count ${NCU_COUNT:-4} \
                    --section SpeedOfLight --section Occupancy --section LaunchStats \
                    --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
                    "${extra[@]}" --csv --page details $cmd > "$OUT/ncu_$i.csv" 2> "$OUT/ncu_$i.log"
                grep -q '"Duration"' "$OUT/ncu_$i.csv" && break
                refused=$((refused + 1))
                cp "$OUT/ncu_$i.log" "$OUT/ncu_${i}_refused_$refused.log"   # why this try gave no rows
            done
        done <<< "${NCU_CMDS:-python3 scripts/tune_ssd.py --profile-run 10 --shapes lm_step --layout block}"
        echo "=== ncu"
        python3 scripts/ncu_summary.py "$OUT"/ncu_*.csv --json "$OUT/ncu_summary.json"
        ;;
    ab)      # same-run A/B of the block benchmark: older tree vs this one, twice each, on GPU 0
        for round in $(seq 1 ${AB_ROUNDS:-2}); do
            for tree in "${AB_TREE:?set AB_TREE to the older tree}" .; do
                tag=$([ "$tree" = . ] && echo new || echo old)
                (cd "$tree" && CUDA_VISIBLE_DEVICES=0 timeout ${AB_TIMEOUT:-150} python3 scripts/bench_block.py \
                    ${AB_ARGS:---cases block} --no-baseline --json "$OUT/ab_${tag}_$round.json") \
                    > "$OUT/ab_${tag}_$round.log" 2>&1
                echo "=== A/B round $round, $tag tree ($tree)"
                sed -n '/^=====/,$p' "$OUT/ab_${tag}_$round.log" | grep -E "^(block|lengths|ssd)"
            done
        done
        ;;
    block)   # scripts/bench_block.py alone on GPU 0 (the kernels against mamba_ssm, same run): one
             # run per line of BLOCK_ARGS, a line's leading NAME=value words its environment (e.g.
             # BLOCK_ARGS=$'--cases lengths\nMATMAMBA_SSD_STATE=parallel --cases lengths')
        run_each_line scripts/bench_block.py bench_block "${BLOCK_TIMEOUT:-330}" "${BLOCK_ARGS:-}"
        ;;
    conv)    # the conv1d's launch variants (scripts/bench_conv.py CONV_ARGS) on GPU 0
        CUDA_VISIBLE_DEVICES=0 timeout ${CONV_TIMEOUT:-200} python3 scripts/bench_conv.py ${CONV_ARGS:-} \
            --json "$OUT/bench_conv.json" > "$OUT/bench_conv.log" 2>&1
        echo "=== bench_conv"; grep -E "best|MISMATCH|Error" "$OUT/bench_conv.log" | head -30
        ;;
    host)    # where the host's time goes in an eager SSD forward + backward, ours and mamba_ssm's
        CUDA_VISIBLE_DEVICES=0 timeout ${HOST_TIMEOUT:-240} python3 scripts/host_profile.py ${HOST_ARGS:-} \
            --json "$OUT/host_profile.json" > "$OUT/host_profile.log" 2>&1
        echo "=== host_profile"; grep -vE "^\s*$" "$OUT/host_profile.log" | head -60
        ;;
    pytest)  # CPU-only tests on this machine's versions (PYTEST_ARGS), beside the GPU stages; in
             # one process (the image has no pytest-xdist, so pyproject's "-n auto" is replaced)
        ( CUDA_VISIBLE_DEVICES= timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider \
            -o addopts="-ra -m 'not slow and not gpu'" $PYTEST_ARGS > "$OUT/pytest.log" 2>&1 ) &
        cpu_pids+=($!)
        ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
    serialize
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
[ ${#cpu_pids[@]} -gt 0 ] && wait "${cpu_pids[@]}"
[ -f "$OUT/pytest.log" ] && { echo "=== pytest ($PYTEST_ARGS)"; tail -15 "$OUT/pytest.log"; }

if [ -d /tmp/check_parts ]; then
    cat /tmp/check_parts/*.log > "$OUT/gpu_check.log"
    python3 - <<'PY' > "$OUT/gpu_check_summary.txt"
import glob, json
res = []
for p in sorted(glob.glob("/tmp/check_parts/*.json")):
    res += json.load(open(p))["results"]
bad = [r for r in res if not r["ok"]]
print(f"=== gpu_check: {len(res) - len(bad)} passed, {len(bad)} failed, "
      f"{len(glob.glob('/tmp/check_parts/*.log')) - len(glob.glob('/tmp/check_parts/*.json'))} jobs unfinished")
for r in bad:
    print("FAIL", r["op"], r["dtype"], r["case"], r["worst_name"], r["worst"], str(r.get("note", ""))[:200])
json.dump(res, open("/tmp/check_parts/all.json", "w"), default=str)
PY
    cp /tmp/check_parts/all.json "$OUT/gpu_check.json"
    cat "$OUT/gpu_check_summary.txt"
    grep -E "^\[FAIL\]|Traceback|Error" "$OUT/gpu_check.log" | head -20
fi
for path in "$OUT"/tune_ssd*.log; do
    [ -f "$path" ] || continue
    echo "=== $(basename "$path" .log): $(cat "${path%.log}.cmd" 2>/dev/null)"; grep -vE "^\s*$" "$path" | tail -45
done
for path in "$OUT"/bench_block*.log; do
    [ -f "$path" ] || continue
    echo "=== $(basename "$path" .log): $(cat "${path%.log}.cmd" 2>/dev/null)"; sed -n '/^=====/,$p' "$path"
    grep -E "Traceback|Error" "$path" | head -5
done
for path in "$OUT"/bench_train*.log "$OUT"/bench_multigpu.log; do
    [ -f "$path" ] || continue
    log=$(basename "$path" .log)
    echo "=== $log"
    grep -E "Traceback|Error|error" "$OUT/$log.log" | head -15
    tail -40 "$OUT/$log.log"
done

# The device tool brings back at most 8 files: pack everything into one archive, and the
# autotuning results beside it for the next visit.
if [ -z "${NO_PACK:-}" ]; then
    tar czf /tmp/visit.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/visit.tgz "$OUT/visit.tgz"
fi
(cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" | tar czf "$OUT/autotune.tgz" -T -)
