#!/usr/bin/env bash
# The embedded default job on one GPU with the Transformer Engine layer spec, bf16 then FP8 (blockwise),
# and a summary table. Runs on the lent H200 after the TE bootstrap (../shared/device/prepare_carry.sh:
# commands 1-6 with .device/c1..c6); small pure-Python deps (hydra, omegaconf, math-verify, rich) come
# as wheels in .device/w. Usage there:  bash tools/device/gpu_default_run.sh [extra hydra overrides]
set -euo pipefail
source /tmp/carry/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .device/w/*.whl
export PYTHONPATH=$PWD:$PWD/kernels:/tmp/site2:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
common=(logging.wandb_mode=disabled logging.plot=false train.device=cuda train.precision=bf16 "$@")
# FP8 GEMMs need dims that are multiples of 128 (blockwise scaling tiles), so the FP8 run widens the
# tiny model to 128; the bf16 run is the default shape.
wide=(model.hidden_size=128 model.ffn_hidden_size=256 model.moe_ffn_hidden_size=128
      model.moe_shared_expert_intermediate_size=128)
RUNS=/tmp/r1runs
run() {  # name, overrides...   (only <name>.log and <name>.jsonl go to $OUT: 8 files come back at most)
  local name=$1; shift
  local t0=$SECONDS
  timeout "${RUN_TIMEOUT:-170}" python3 -m r1mega.train logging.out_dir="$RUNS/$name" "${common[@]}" "$@" \
    > "$OUT/$name.log" 2>&1 && echo "$name ok" || { echo "$name FAILED"; tail -30 "$OUT/$name.log"; }
  mkdir -p "$RUNS/$name"; echo $((SECONDS - t0)) > "$RUNS/$name/wall"
  cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.jsonl" 2>/dev/null || true
}
run bf16                                          # GPU path: TE spec, Triton GRPO loss (algo.loss_impl=auto)
run bf16_torchloss algo.loss_impl=torch           # same, plain PyTorch loss: the end-to-end kernel ratio
run bf16_wide "${wide[@]}"                        # the FP8 run's shape in bf16: its baseline
run fp8_blockwise "${wide[@]}" train.fp8=blockwise
python3 - "$OUT" "$RUNS" <<'PY'
import json, sys, pathlib, statistics as st
out, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
print(f"{'run':<14}{'wall s':>8}{'step s':>8}{'gen s':>7}{'lp s':>7}{'train s':>8}{'tok/s':>9}"
      f"{'greedy b->a':>14}{'sampled b->a':>15}{'|dlogp| max':>12}")
for name in ("bf16", "bf16_torchloss", "bf16_wide", "fp8_blockwise"):
    f = out / f"{name}.jsonl"
    if not f.exists():
        print(f"{name:<14} (no metrics)"); continue
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r][1:] or [r for r in rows if "time/step" in r]
    ev = [r for r in rows if "eval/greedy_accuracy" in r]
    med = lambda k: st.median(r[k] for r in steps)
    wall = float((runs / name / "wall").read_text())
    print(f"{name:<14}{wall:>8.0f}{med('time/step'):>8.3f}{med('time/generation'):>7.3f}{med('time/logprobs'):>7.3f}"
          f"{med('time/training'):>8.3f}{med('perf/tokens_per_s'):>9.0f}"
          + (f"{ev[0]['eval/greedy_accuracy']:>7.3f}->{ev[-1]['eval/greedy_accuracy']:.3f}"
             f"{ev[0]['eval/sampled_accuracy']:>8.3f}->{ev[-1]['eval/sampled_accuracy']:.3f}" if len(ev) > 1
             else f"{'(no final eval)':>29}")
          + f"{max(r['rollout/logp_diff_max'] for r in steps):>12.4f}")
PY
