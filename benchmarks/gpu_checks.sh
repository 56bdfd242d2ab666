#!/usr/bin/env bash
# What a GPU machine checks that the CPU test suite cannot: the GPU paths end to end on the tiny in-process
# models, and the GPU figures. Run from the repository root on a machine with CUDA:
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]        (about 5 minutes on one H200)
#
# 1. the trainer=gpu / trainer=fsdp configs instantiated for real (tests/test_configs.py);
# 2. experiment=paper_small's shape on tiny models with trainer=gpu (bf16-mixed): untrained, SFT, +prior,
#    +prior+posterior, 5 seeds, paired intervals; a check of the GPU path, not a result;
# 3. trainer=fsdp on one GPU; an online white-box teacher; on-policy GKD and MiniLLM (generation on the GPU);
# 4. bench_precision.py (fp32 vs bf16, SmolLM2-135M's architecture) and bench_kd_loss.py (peak GPU memory).
# Each step runs (at most STEP_TIMEOUT s, default 240) whatever the others did; ONLY=<regex> runs the steps it
# matches; OUT_DIR gets gpu_checks.log and summary.tsv (step, exit, seconds).
set -u
OUT_DIR=${1:-gpu_checks_out}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_checks.log"
SUMMARY="$OUT_DIR/summary.tsv"
: >"$LOG"
printf 'step\texit\tseconds\n' >"$SUMMARY"
PY=${PYTHON:-python3}
export WANDB_MODE=offline PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
WORK=$(mktemp -d)
export KDL_ARTIFACTS="$WORK/artifacts" KDL_TINY="$WORK/tiny"

step() {  # step NAME COMMAND...: run it, log it, time it, never stop the script
  local name=$1 start rc
  shift
  [[ $name =~ ${ONLY:-.} ]] || return 0
  echo "===== $name: $*" >>"$LOG"
  start=$(date +%s)
  (cd "$WORK" && timeout "${STEP_TIMEOUT:-240}" "$@") >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" | tee -a "$SUMMARY"
}

REPO=$(pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'lightning', lightning.__version__, 'gpu', torch.cuda.is_available())"
  lscpu | grep -m1 'Model name'; } >>"$LOG" 2>&1
"$PY" -c "from pathlib import Path; from kd_lightning.models.tiny_assets import build_tiny_assets as b
b(Path('$KDL_TINY'))" >>"$LOG" 2>&1

step configs "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_configs.py" -k "trainer"

mkdir -p "$WORK/conf/experiment"
cat >"$WORK/conf/experiment/gpu_small.yaml" <<'EOF'
# @package _global_
defaults:
  - tiny
  - override /trainer: gpu
  - _self_
seeds: [0, 1, 2, 3, 4]
evaluate_students: true
compare_to: sft
evaluation: {generation_limit: 4, max_new_tokens: 8}
variants:
  untrained: {loss: [hard_ce], trainer: {max_steps: 0}, seeds: [0]}
  sft: [hard_ce]
  prior: [hard_ce, prior_kl]
  prior_posterior: [hard_ce, prior_kl, posterior_kl]
EOF
step pipeline_gpu_5_seeds "$PY" -m kd_lightning.cli.kdl pipeline experiment=gpu_small "hydra.searchpath=[file://$WORK/conf]"
cat "$WORK"/outputs/pipeline/*/comparison.md >>"$LOG" 2>/dev/null
step distill_gpu "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=gpu "loss=[hard_ce,prior_kl]"
step distill_fsdp_1gpu "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=fsdp trainer.devices=1 "loss=[hard_ce,prior_kl]"
step online_teacher_gpu "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=gpu module=online_teacher teacher=local \
  "teacher.path=$KDL_TINY" "loss=[hard_ce,forward_kl]"
step fsdp_online_teacher "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=fsdp trainer.devices=1 \
  module=online_teacher teacher=local "teacher.path=$KDL_TINY" "loss=[hard_ce,forward_kl]"
step fsdp_minillm "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=fsdp trainer.devices=1 recipe=minillm \
  teacher=local "teacher.path=$KDL_TINY"
step fsdp_gkd "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=fsdp trainer.devices=1 recipe=gkd \
  teacher=local "teacher.path=$KDL_TINY"
step gkd_gpu "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=gpu recipe=gkd teacher=local "teacher.path=$KDL_TINY"
step minillm_gpu "$PY" -m kd_lightning.cli.kdl distill experiment=tiny trainer=gpu recipe=minillm teacher=local "teacher.path=$KDL_TINY"
step bench_precision_cuda "$PY" "$REPO/benchmarks/bench_precision.py" --device cuda --batch 16 --seq 1024
step bench_kd_loss_cuda "$PY" "$REPO/benchmarks/bench_kd_loss.py" --device cuda
step bench_kd_loss_cuda_32k "$PY" "$REPO/benchmarks/bench_kd_loss.py" --device cuda --rows 32768
grep -h '^{"bench"' "$LOG" >"$OUT_DIR/bench.jsonl"
cat "$SUMMARY"
