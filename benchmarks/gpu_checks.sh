#!/usr/bin/env bash
# The GPU checks of issue 16 in one run (a lent GPU has minutes, not hours): run from the repository root.
#
#   OUT=/some/folder bash benchmarks/gpu_checks.sh          # on the GPU machine (its python3 holds torch + timm)
#   DEVICE=cpu QUICK=1 OUT=/tmp/g bash benchmarks/gpu_checks.sh   # the same steps, tiny, on a CPU (the tests run this)
#   DEADLINE=540 (default): the whole script's time limit in seconds; the steps below run in order of importance
#
# 1. throughput.py: XCiT-S12 at 224 px, bf16 + channels-last, clean / PGD-1 / PGD-2 (efficient), images/s and
#    the fraction of the bf16 matmul peak (item 3);
# 2. peer_torchattacks.py with --bf16 --channels-last (the 1.25x target; torchattacks from benchmarks/.peer);
# 3. train.py with --amp --amp-dtype float16 (the grad scaler on CUDA), then resumed for one more epoch;
# 4. train.py under torchrun, one process (the NCCL process group on CUDA);
# 5. compile_check.py (does torch.compile pay off on this device?).
# The GPU machine's image has torch and timm but not wandb, pyautoattack or gcsfs: none of these steps imports them.
# torchattacks comes from benchmarks/.peer (git-ignored: carry it along). Each step has its own time limit and its log in $OUT; a failed step does not stop the others, the exit
# status says whether all passed. JSON results land in $OUT (copy them to benchmarks/results/ to keep them).
set -u
: "${OUT:?set OUT to the folder for logs and JSON}"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
failed=()

# the whole script ends within DEADLINE seconds (a lent GPU's command limit is 600 s): each step gets at most
# what is left, and a step with under 20 s left is skipped (and counted as failed), so the summary is always written
DEADLINE=${DEADLINE:-540}

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, remember failures
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name SKIPPED: ${left}s left of DEADLINE=${DEADLINE}s"
        failed+=("$name(skipped)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "    ok in $((SECONDS - t0))s"
    else
        echo "    FAILED (exit $?) in $((SECONDS - t0))s; last lines:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/    | /'
        failed+=("$name")
    fi
}

if [ "$QUICK" = 1 ]; then
    TP=(--model test_vit --img-size 32 --batch-size 4 --num-classes 10 --steps 1 2 --steps-per-call 1 --rounds 1
        --warmup 0 --peak-size 256 --precision fp32)
    PEER=(--model test_vit --batch-size 4 --steps 1 --rounds 1 --reps 1 --warmup 0 --channels-last)
    TRAIN=(--model test_vit --epochs 1 --max-train-steps 2 --val-num-samples 64)
    COMPILE=(--models test_vit --batch-size 4 --rounds 1 --reps 1 --warmup 0 --backend aot_eager)
    AMP=()
else
    TP=(--model xcit_small_12_p16_224 --img-size 224 --batch-size 128 --steps 1 2 --precision bf16)
    PEER=(--model resnet18 --batch-size 256 --steps 1 2 --bf16 --channels-last)
    TRAIN=(--epochs 1)
    COMPILE=(--models resnet18 xcit_nano_12_p4_32 --bf16)
    AMP=(--amp --amp-dtype float16)
fi

"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/versions.txt"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/versions.txt" 2>&1

step throughput 240 "$PY" benchmarks/throughput.py --device "$DEVICE" "${TP[@]}" --json "$OUT/throughput.json"
step peer 180 "$PY" benchmarks/peer_torchattacks.py --device "$DEVICE" "${PEER[@]}" --json "$OUT/peer_torchattacks.json"
RUN="$OUT/runs"
step train_amp 180 "$PY" train.py -c configs/quickstart.yaml "${TRAIN[@]}" "${AMP[@]}" --output "$RUN" --experiment amp
step train_amp_resume 180 "$PY" train.py -c configs/quickstart.yaml "${TRAIN[@]}" "${AMP[@]}" --epochs 2 \
    --output "$RUN" --experiment amp --resume auto
step scaler_state 60 "$PY" - "$RUN/amp/last.pth.tar" "$DEVICE" "$QUICK" <<'EOF'
import sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
scaler = ckpt.get("grad_scaler")
print("epoch", ckpt["epoch"], "grad_scaler", scaler)
if sys.argv[2] == "cuda" and sys.argv[3] != "1":
    assert scaler and scaler["scale"] > 0, "float16 --amp on CUDA saved no grad scaler state"
assert ckpt["epoch"] == 1, "the resumed run did not finish its second epoch"
EOF
step torchrun 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train.py -c configs/quickstart.yaml \
    "${TRAIN[@]}" --output "$RUN" --experiment ddp
step compile 300 "$PY" benchmarks/compile_check.py --device "$DEVICE" "${COMPILE[@]}" --json "$OUT/compile_check.json"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
