#!/usr/bin/env bash
# The end-to-end job on the GPU machine (issue 12, docs/perf/e2e.md): tools/bench_e2e_trl.py's stages with the
# carries' environment, results in $OUT/e2e_results.tgz (every stage so far: the last archive is the whole run).
#
#   bash tools/device/e2e.sh STAGES TIMEOUT_S [hydra overrides...]          in this command (<= 600 s in all)
#   bash tools/device/e2e.sh --start STAGES TIMEOUT_S [hydra overrides...]  in the background (setsid): returns now
#   bash tools/device/e2e.sh --wait SECONDS                                 until that job ends, at most SECONDS;
#                                                                           progress, tails, $OUT/e2e_results.tgz
# --start runs the stages back to back with no gap between device commands and no 600 s cap on the job (each stage
# still has TIMEOUT_S); the machine stays up only while commands keep coming (30 s idle: gone), so send --wait
# commands one after another until it prints "job: done". The HF folders stay in /tmp/e2e while the machine is up.
# Needs the TE, SGLang, SmolLM2 and e2e carries (the header of docs/perf/e2e.md).
set -u
JOB=/tmp/e2e_job
mode=run
case "${1:-}" in --start|--wait) mode=${1#--}; shift ;; esac
if [ "$mode" = wait ]; then
  limit=${1:-540} t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$limit" ] && [ ! -f $JOB/rc ] && kill -0 "$(cat $JOB/pid 2>/dev/null)" 2>/dev/null; do
    sleep 5
  done
  grep -h '^\[' $JOB/log 2>/dev/null | cut -c1-300        # the stage lines: started, wall, peak memory, rc
  for f in /tmp/e2e/*.log; do [ -f "$f" ] || continue; echo "--- tail of $f"; grep -v -e Warning -e warnings.warn \
    -e 'it/s]' -e 'ServerArgs(' -e 'Capturing ' "$f" | tail -n "${TAIL:-4}" | cut -c1-300; done
  if [ -f $JOB/rc ]; then echo "job: done, rc $(cat $JOB/rc)"; tail -n 40 $JOB/log | grep -v '^\['
  elif [ -f $JOB/pid ] && kill -0 "$(cat $JOB/pid)" 2>/dev/null; then echo "job: running"
  else echo "job: none (not started, or lost with an earlier machine)"; fi
  source /tmp/carry/e2e_env.sh 2>/dev/null
  python3 tools/bench_e2e_trl.py --pack --out /tmp/e2e --results "${OUT:-/tmp/e2e_out}" >/dev/null
  nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null
  exit 0
fi
stages=$1 timeout=$2; shift 2
source /tmp/carry/env.sh; source /tmp/carry/sglang_env.sh; source /tmp/carry/smol_env.sh; source /tmp/carry/e2e_env.sh
export PYTHONPATH=$PWD:$PWD/kernels:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
# FP8 (the r1mega_fp8 stage): FP8=blockwise|tensorwise, or by default the recipe TE takes for SmolLM2's shapes
# (tools/device/fp8_probe.py); FP8_MINUTES: its train.max_minutes (default: the RL stages' one).
fp8=()
case ",$stages," in *,r1mega_fp8,*)
  fp8=(--fp8 "${FP8:-$(python3 tools/device/fp8_probe.py)}"); echo "FP8 recipe: ${fp8[1]}"
  [ -n "${FP8_MINUTES:-}" ] && fp8+=(--fp8-minutes "$FP8_MINUTES") ;;
esac
job=(python3 -u tools/bench_e2e_trl.py --out /tmp/e2e --stage "$stages" --timeout "$timeout" "${fp8[@]}" -- train.eval_every=0
     logging.plot=false logging.wandb_mode=offline "$@")
if [ "$mode" = start ]; then
  rm -rf $JOB && mkdir -p $JOB /tmp/e2e
  setsid bash -c 'echo $$ > '$JOB'/pid; "$@" > '$JOB'/log 2>&1; echo $? > '$JOB'/rc' _ "${job[@]}" < /dev/null > /dev/null 2>&1 &
  sleep 2; echo "job started (pid $(cat $JOB/pid)): ${job[*]}"; cat $JOB/log
  exit 0
fi
"${job[@]:0:3}" --results "${OUT:-/tmp/e2e_out}" "${job[@]:3}"
rc=$?
for f in /tmp/e2e/*.log; do echo "--- tail of $f"; grep -v -e Warning -e warnings.warn -e 'it/s]' -e 'ServerArgs(' \
  -e 'Capturing ' "$f" | tail -n "${TAIL:-6}" | cut -c1-400; done
nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null
exit $rc
