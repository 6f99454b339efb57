#!/usr/bin/env bash
# What only a GPU can show, in one go on a one-GPU machine: bf16 and fp16 on CUDA for the three scripts, DeepSpeed
# ZeRO-2/3 and FSDP2 configs, --torch_compile, and bench_gpu.py (ours vs the official example's approach).
#
#   OUT=/tmp/gpu_checks bash benchmarks/gpu_checks.sh      # about 8 minutes on one H100 (each step time-limited)
#   QUICK=1 OUT=/tmp/gpu_checks bash benchmarks/gpu_checks.sh   # a smoke run of the script itself, on CPU too
#   ONLY="clip_zero2 clip_fsdp" DEMOS=clip ... bash benchmarks/gpu_checks.sh   # some steps only (names below)
#
# Packages the machine lacks can lie as wheels in .whl/ (installed to /tmp/site first). Each step runs under its
# own time limit and the next runs whatever happened; the end prints one line per step (exit status, seconds,
# key metrics) and writes them to $OUT/summary.json; every step's output is in $OUT/checks.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/checks.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 - <<'EOF'
import importlib
for name in ("torch", "transformers", "datasets", "accelerate", "deepspeed", "pyarrow", "PIL", "torchvision"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader

RUNS=/tmp/gpu_runs
mkdir -p "$RUNS"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
step() {  # step NAME SECONDS OUTPUT_DIR COMMAND...: run it under a time limit, record status, time and output dir
  local name=$1 limit=$2 dir=$3
  shift 3
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name: $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  printf '{"name": "%s", "rc": %d, "seconds": %d, "dir": "%s"}\n' "$name" "$rc" "$((SECONDS - start))" "$dir" >> "$STEPS"
}

# The demos' data and tiny models, written where their configs look (demo/), the three at once.
pids=()
for demo in ${DEMOS:-clip caption vqa}; do
  python3 -m utils.demo $demo > "$RUNS/demo_$demo.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"  # by pid: a bare wait would also wait for the tee above, which ends only with this script
GPU="--use_cpu false --dataloader_num_workers 4 --save_strategy no --report_to none"
BENCH=""
if [ -n "${QUICK:-}" ]; then  # a smoke run of this script on any machine: tiny slices, one epoch, the benchmark's quick mode
  GPU="$GPU --max_train_samples 64 --max_eval_samples 16 --max_predict_samples 16"
  BENCH="--quick"
fi

step bench_gpu 240 "$OUT" python3 benchmarks/bench_gpu.py $BENCH --measured_steps 20 --compile --results "$OUT/bench_gpu.json"
step clip_bf16 120 "$RUNS/clip_bf16" python3 run_clip.py configs/demo_clip.yaml $GPU --bf16 true --output_dir "$RUNS/clip_bf16"
SHORT="$GPU --bf16 true --num_train_epochs 3"
step clip_zero2 90 "$RUNS/clip_zero2" torchrun --nproc_per_node 1 run_clip.py configs/demo_clip.yaml $SHORT \
  --deepspeed configs/deepspeed_zero2.json --output_dir "$RUNS/clip_zero2"
step clip_zero3 90 "$RUNS/clip_zero3" torchrun --nproc_per_node 1 run_clip.py configs/demo_clip.yaml $SHORT \
  --deepspeed configs/deepspeed_zero3.json --output_dir "$RUNS/clip_zero3"
step clip_fsdp 90 "$RUNS/clip_fsdp" accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 1 run_clip.py \
  configs/demo_clip.yaml $SHORT --output_dir "$RUNS/clip_fsdp"
step caption_bf16 120 "$RUNS/caption_bf16" python3 run_blip_caption.py configs/demo_caption.yaml $SHORT --output_dir "$RUNS/caption_bf16"
step vqa_bf16 90 "$RUNS/vqa_bf16" python3 run_vilt_vqa.py configs/demo_vqa.yaml $SHORT --output_dir "$RUNS/vqa_bf16"
step clip_fp16 60 "$RUNS/clip_fp16" python3 run_clip.py configs/demo_clip.yaml $GPU --fp16 true --num_train_epochs 3 \
  --output_dir "$RUNS/clip_fp16"
step clip_compile 120 "$RUNS/clip_compile" python3 run_clip.py configs/demo_clip.yaml $SHORT --torch_compile true \
  --output_dir "$RUNS/clip_compile"

python3 - "$STEPS" "$OUT/summary.json" <<'EOF'
import json, os, sys

keys = ("eval_i2t_r1", "eval_t2i_r1", "predict_i2t_r1", "predict_t2i_r1", "eval_cider", "predict_cider", "eval_vqa_accuracy",
        "predict_vqa_accuracy", "train_loss", "train_samples_per_second", "train_runtime")
steps = [json.loads(line) for line in open(sys.argv[1])]
for s in steps:
    path = os.path.join(s["dir"], "all_results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    s["metrics"] = {k: round(v, 4) for k, v in results.items() if k in keys}
    print(f"{s['name']:14s} rc={s['rc']:<4d} {s['seconds']:4d} s  {s['metrics']}")
json.dump(steps, open(sys.argv[2], "w"), indent=1)
EOF
