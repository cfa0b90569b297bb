#!/usr/bin/env bash
# The GPU benchmark suite in one call: everything a GPU machine lent for a few minutes should measure.
#
#   bench/gpu_suite.sh              # on a GPU machine: <= 8 minutes on one H100/H200, no network
#   bench/gpu_suite.sh --plan-only  # the same steps on the CPU with tiny shapes (a unit test runs this)
#
# Steps (each with its own time limit, 10 minutes in all at most; a failed step is recorded and the suite goes on):
#   1. packed-attention exactness on the GPU: tests/unit/trainer/test_trainer_hot_path.py (SDPA and flex
#      attention on the GPU; the flash-attention case runs where flash_attn is installed), and that a
#      micro-batch's build, forward and backward never make the host wait (torch's sync debug mode)
#   2. bench/gpu_trainer_check.py: the trainer's own command on the GPU: fp16 with a gradient scaler,
#      accumulation, and resume after SIGTERM equal to an uninterrupted run
#   3. bench/gpu_mfu.py: GPT-2-124M MFU, kubetune's trainer vs a tuned reference loop; LoRA on a
#      ~1B Llama, kubetune vs TRL (tokens/s, peak memory)
#   4. bench/trainer_throughput.py on GPT-2-124M: kubetune vs HF Trainer + DataCollatorWithFlattening (the
#      best peer in every run so far; TRL is the LoRA peer in step 3), 3 rounds, ABBA
#   5. bench/distributed_scaling.py: tokens/s with 1 rank and with one rank per visible GPU (scaling
#      efficiency); skipped, and recorded so, with one GPU
#   6. bench/serve_vllm_check.py (the vLLM serving check): "not run" where vllm is not installed
# Results: bench/results/<UTC date>-<gpu>.json (every step's RESULT record, exit code and time) and
# each step's full output next to it in bench/results/<UTC date>-<gpu>.log. Uses the project's
# environment ($PYTHON, else the active python); needs nothing from the network.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-$(command -v python || command -v python3)}
plan_only=0
only=""
all_steps="packed-attention trainer-check gpu-mfu throughput scaling serve-vllm"
results_dir=${KUBETUNE_RESULTS_DIR:-$repo/bench/results}
while (($#)); do
  case "$1" in
    --plan-only) plan_only=1 ;;
    --only)
      only=${2:-}
      shift
      for name in ${only//,/ }; do
        if [[ " $all_steps " != *" $name "* ]]; then
          echo "gpu_suite: --only: unknown step '$name' (steps: ${all_steps// /, })" >&2
          exit 2
        fi
      done
      ;;
    *) echo "gpu_suite: unknown argument $1 (allowed: --plan-only, --only STEP[,STEP...])" >&2; exit 2 ;;
  esac
  shift
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
if [[ -z "$gpu" && $plan_only == 0 ]]; then
  echo "gpu_suite: no GPU visible (torch.cuda.is_available() is false); --plan-only runs the steps on the CPU" >&2
  exit 2
fi
slug=$(echo "${gpu:-cpu-plan}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')
stamp=$(date -u +%Y-%m-%d)
mkdir -p "$results_dir"
suffix=${only:+-${only//,/_}}  # a partial run (--only) does not overwrite a whole one
out="$results_dir/$stamp-$slug$suffix.json"
log="$results_dir/$stamp-$slug$suffix.log"
: > "$log"
steps_file=$(mktemp)
trap 'rm -f "$steps_file" "$steps_file.out"' EXIT
mode_args=()
limit_scale=1
if ((plan_only)); then
  mode_args=(--plan-only)
  limit_scale=10  # the limits are sized for a GPU; a plan runs on a (possibly busy) CPU
fi

# step NAME LIMIT_SECONDS COMMAND...: runs it, appends its output to the log, records rc, seconds, RESULT.
step() {
  local name=$1 limit=$2
  shift 2
  if [[ -n $only && ",$only," != *",$name,"* ]]; then
    return
  fi
  echo "== $name: $*" | tee -a "$log"
  local started=$SECONDS
  timeout --kill-after=10 "$((limit * limit_scale))" "$@" 2>&1 | tee -a "$log" > "$steps_file.out"
  local rc=${PIPESTATUS[0]}
  local result
  result=$(grep -E '^(PARTIAL )?RESULT ' "$steps_file.out" | tail -1 | sed -E 's/^(PARTIAL )?RESULT //')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" "${result:-null}" >> "$steps_file"
  echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$log"
}

skip() {
  if [[ -n $only && ",$only," != *",$1,"* ]]; then
    return
  fi
  echo "== $1: skipped: $2" | tee -a "$log"
  printf '%s\tskipped\t0\t%s\n' "$1" "$("$python" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$2")" >> "$steps_file"
}

"$python" -c 'import sys, torch, transformers, accelerate, peft
try:
    import trl, datasets; peers = f"trl {trl.__version__}, datasets {datasets.__version__}"
except ImportError as error:
    peers = f"no peers: {error}"
print(f"gpu_suite: python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__},"
      f" accelerate {accelerate.__version__}, peft {peft.__version__}, {peers}")' 2>&1 | tee -a "$log"

# Cheap correctness first, then the figures, so that a slow step cannot cost the checks.
step packed-attention 150 "$python" -m pytest -q -p no:cacheprovider tests/unit/trainer/test_trainer_hot_path.py \
  -k "PackedAttention or Selection or gpu"
step trainer-check 120 "$python" bench/gpu_trainer_check.py "${mode_args[@]}"
step gpu-mfu 300 "$python" bench/gpu_mfu.py "${mode_args[@]}"
if ((plan_only)); then
  step throughput 60 "$python" bench/trainer_throughput.py --quick --sides "kubetune,HF Trainer+flattening"
else
  # The best peer on the GPU with GPT-2-124M (its real vocabulary): three rounds, ABBA, no padded side row.
  step throughput 180 "$python" bench/trainer_throughput.py --shape gpt2-124m --examples 2000 --max-seq-length 1024 \
    --batch-size 8 --rounds 3 --sides "kubetune,HF Trainer+flattening"
fi
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
if ((plan_only)); then
  step scaling 120 "$python" bench/distributed_scaling.py --plan-only
elif ((gpus > 1)); then
  step scaling 120 "$python" bench/distributed_scaling.py --reps 3 --width 768 --layers 12
else
  skip scaling "one GPU visible: nothing to scale across (nccl takes one rank per GPU); CPU figures are in bench/README.md"
fi
if [[ -f bench/serve_vllm_check.py ]]; then
  step serve-vllm 30 "$python" bench/serve_vllm_check.py "${mode_args[@]}"
else
  skip serve-vllm "bench/serve_vllm_check.py is not in this checkout (the vLLM serving check); nothing measured"
fi

"$python" - "$steps_file" "$out" "$gpu" "$plan_only" <<'EOF'
import json, os, sys, time
steps_file, out, gpu, plan_only = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
steps = {}
for line in open(steps_file):
    name, rc, seconds, result = line.rstrip("\n").split("\t", 3)
    steps[name] = {"exit": rc if rc == "skipped" else int(rc), "seconds": int(seconds), "result": json.loads(result)}
record = {"suite": "gpu_suite", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpu": gpu or None,
          "planOnly": plan_only, "loadAverage": os.getloadavg()[0], "steps": steps}
with open(out, "w") as handle:
    json.dump(record, handle, indent=1)
print(f"gpu_suite: results in {out}")
failed = [n for n, s in steps.items() if s["exit"] not in (0, "skipped")]
print("gpu_suite: failed steps: " + (", ".join(failed) if failed else "none"))
sys.exit(1 if failed else 0)
EOF
