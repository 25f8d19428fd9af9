#!/usr/bin/env bash
# One device command of the end-to-end job (issue 12, docs/perf/e2e.md): tools/bench_e2e_trl.py's stages with the
# carries' environment, results in $OUT/e2e_results.tgz (every stage so far: the last archive is the whole run).
#
#   bash tools/device/e2e.sh STAGES TIMEOUT_S [hydra overrides...]      (on the GPU machine, project root)
#
# e.g. bash tools/device/e2e.sh cold,eval_cold 300 train.max_minutes=6; the HF folders stay in /tmp/e2e between
# commands while the machine is up. Needs the TE, SGLang, SmolLM2 and e2e carries (the header of docs/perf/e2e.md).
set -u
stages=$1 timeout=$2; shift 2
source /tmp/carry/env.sh; source /tmp/carry/sglang_env.sh; source /tmp/carry/smol_env.sh; source /tmp/carry/e2e_env.sh
export PYTHONPATH=$PWD:$PWD/kernels:$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
python3 -u tools/bench_e2e_trl.py --out /tmp/e2e --results "${OUT:-/tmp/e2e_out}" --stage "$stages" \
  --timeout "$timeout" -- train.eval_every=0 logging.plot=false logging.wandb_mode=offline "$@"
rc=$?
for f in /tmp/e2e/*.log; do echo "--- tail of $f"; grep -v -e Warning -e warnings.warn -e 'it/s]' -e 'ServerArgs(' \
  -e 'Capturing ' "$f" | tail -n "${TAIL:-6}" | cut -c1-400; done
nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null
exit $rc
