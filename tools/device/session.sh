#!/usr/bin/env bash
# One device command = a list of named stages, each with its own hard timeout, all inside one deadline.
#
#   bash tools/device/session.sh DEADLINE_S stage[:timeout_s] ...        (on the GPU machine, project root)
#
# Run after the 12 carry commands (docs/perf/sglang.md, "Next GPU session"): send the first one alone and the others
# only once it ran (while no machine is lent, each queued call is refused at 15 s of device time). Every stage's log goes to /tmp/r1logs/<stage>.log and its
# tail to stdout; after every stage /tmp/r1logs (logs + JSON results) is packed into $OUT/r1logs.tgz, so whatever
# finished comes back even when a later stage is killed. SGLang processes left by a stage are killed before the next
# (an SGLang failure can leave its schedulers holding memory). A stage written +name runs in the background. The stages are the commands of docs/perf/*.md.
set -u
deadline=$(( $(date +%s) + $1 )); shift
source /tmp/carry/env.sh; source /tmp/carry/sglang_env.sh; source /tmp/carry/smol_env.sh; source /tmp/carry/e2e_env.sh
export PYTHONPATH=$PWD:$PWD/kernels:$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
export GSM8K_DIR=${GSM8K_DIR:-/tmp/gsm8k} SMOLLM2_HF=${SMOLLM2_HF:-/tmp/smollm2_hf}
L=/tmp/r1logs; mkdir -p $L
CTE="python3 -u tools/compare_trainer_engine.py"
CE="python3 -u tools/compare_engines.py"
TRAIN="python3 -u -m r1mega.train"
EVAL="python3 -u -m r1mega.eval.cli"
E='{"debug_tensor_dump_output_folder": null}'

cmd_of() {  # stage name -> command line (sizes from env: SMOKE=1 makes every stage small)
  local s=${SMOKE:-0} n=64; [ "$s" = 1 ] && n=16
  local smol="$CTE --hf-dir $SMOLLM2_HF --prompts $n --json $L/$1.json"    # SGLang vs trainer on SmolLM2
  local tiny="--tokenizer-from $SMOLLM2_HF --prompts $n --json $L/$1.json"  # ... on a tiny random model
  local head="data.template=chat train.fp32_lm_head=true"
  local ev="$EVAL model.hf_path=$SMOLLM2_HF train.precision=bf16 train.device=cuda eval.template=chat \
eval.save_responses=false logging.out_dir=$L/$1"                               # r1mega-eval on SmolLM2
  case $1 in
    cte_smol) echo "$smol --bench-gen --floor -- $head" ;;
    cte_smol_det) echo "$smol -- $head rollout.deterministic=true" ;;
    cte_smol_bf16) echo "$smol -- data.template=chat" ;;
    cte_smol_fi)  # flashinfer attention + sampling (JIT-built on first use with the machine's nvcc): tokens/s vs triton
      echo "$smol --bench-gen -- $head rollout.attention_backend=flashinfer rollout.sampling_backend=flashinfer" ;;
    cte_qmoe) echo "$CTE --family qwen3_moe $tiny -- $head rollout.routing_replay=true" ;;
    cte_dsv3) echo "$CTE --family deepseek_v3 $tiny -- $head rollout.routing_replay=true" ;;
    cte_wide) echo "$CTE --family llama --wide --tokenizer-from $SMOLLM2_HF --prompts 8 --json $L/$1.json -- data.template=chat" ;;
    ce_smol) echo "$CE --hf-dir $SMOLLM2_HF --fp32-lm-head --prompts $n --greedy-prompts $n --flattened --json $L/ce_smol.json --engine-kwargs '$E'" ;;
    grpo_sglang)
      local st=20 sft=100; [ "$s" = 1 ] && st=2 sft=10
      echo "$TRAIN +preset=smollm2_gsm8k train.steps=$st sft.steps=$sft train.eval_every=0 data.num_eval=64 train.fp32_lm_head=true train.offload_optimizer_during_rollout=true rollout.max_logp_gap=0.5 algo.tis=token logging.wandb_mode=offline logging.out_dir=$L/grpo_sglang train.save_every=0 train.save_dir=/tmp/ckpt/grpo_sglang train.max_minutes=8" ;;  # the checkpoint stays out of r1logs
    eval_gsm8k|eval_math500)  # one set a stage; eval_progress.json (rates, tokens/s) after every chunk
      local lim=0 k=16 ch=330; [ "$s" = 1 ] && lim=32 k=2; [ $1 = eval_math500 ] && ch=250
      echo "$ev rollout=sglang rollout.max_batch_size=1024 rollout.cuda_graph_max_bs=1024 eval.sets=[${1#eval_}] eval.k=$k eval.limit=$lim eval.max_new_tokens=1024 eval.chunk_problems=$ch logging.wandb_mode=offline" ;;
    eval_greedy|eval_greedy_ln)
      local x=""; [ $1 = eval_greedy_ln ] && x="eval.extract=last_number"
      echo "$ev rollout=sglang eval.sets=[gsm8k] eval.greedy=true $x eval.max_new_tokens=1024 logging.wandb_mode=disabled" ;;
    eval_cmp_sglang|eval_cmp_megatron)
      local eng=${1#eval_cmp_} lim=64 bs=1024 g=""; [ "$s" = 1 ] && lim=16; [ $eng = megatron ] && bs=512  # 1600 answers did not fit 170 s
      [ $eng = sglang ] && g="rollout.cuda_graph_max_bs=1024"  # decode graphs up to the batch (SGLang's own cap: 256)
      echo "$ev rollout=$eng rollout.max_batch_size=$bs $g eval.sets=[gsm8k] eval.k=16 eval.limit=$lim eval.max_new_tokens=512 eval.chunk_problems=2000 eval.extract=last_number logging.wandb_mode=disabled" ;;  # last number: a pass@1 above 0 to compare
    eval_cmp) echo "python3 tools/compare_eval_engines.py $L/eval_cmp_megatron/eval.json $L/eval_cmp_sglang/eval.json --labels megatron sglang" ;;
    bench_step)
      if [ "$s" = 1 ]; then echo "python3 -u tools/bench_train_step.py --models qwen3,dsv3 --precisions bf16,fp8 --layers 1 --steps 1 --tokens 16384 --no-logprob"
      else echo "python3 -u tools/bench_train_step.py"; fi ;;
    bench_qwen3) echo "python3 -u tools/bench_train_step.py --models qwen3 --modes padded,packed,packed_fused --verbose" ;;
    bench_dsv3) echo "python3 -u tools/bench_train_step.py --models dsv3 --no-logprob --verbose" ;;  # each fits one 10-min command (padded steps unprofiled)
    *) echo "false unknown-stage-$1" ;;
  esac
}

pack() {  # logs + JSON back in one file under the 16 MiB limit: never checkpoints or weights; eval.json only if it fits
  local x=(--exclude=checkpoints --exclude='*.safetensors' --exclude='*.distcp' --exclude='*.pt' --exclude='*.bin')
  tar czf $OUT/r1logs.tgz "${x[@]}" -C /tmp r1logs 2>/dev/null
  [ $(stat -c %s $OUT/r1logs.tgz) -gt 15000000 ] && tar czf $OUT/r1logs.tgz "${x[@]}" --exclude=eval.json -C /tmp r1logs
}
quiet() { grep -v -e Warning -e warnings.warn -e 'it/s]' -e 'ServerArgs(' -e 'Capturing ' -e clean_up_tokenization "$@"; }
summary=$L/summary.txt; echo "--- command at $(date -u +%H:%M:%S): $*" >> $summary; mark=$(wc -l < $summary)
bg=()
for spec in "$@"; do
  name=${spec%%:*}; to=${spec#*:}; [ "$to" = "$spec" ] && to=300
  left=$(( deadline - $(date +%s) - 35 ))  # 20 s of TERM grace + packing
  [ $left -lt 30 ] && { echo "SKIP $name (deadline)" | tee -a $summary; continue; }
  [ $to -gt $left ] && to=$left
  if [ "${name:0:1}" = "+" ]; then  # +stage: in the background, beside the next ones (smoke runs only)
    name=${name:1}; c=$(cmd_of $name); echo "=== $name in the background (timeout ${to}s): $c"
    ( t0=$(date +%s); timeout -s KILL $to bash -c "$c" > $L/$name.log 2>&1; rc=$?
      echo "$name rc=$rc wall=$(( $(date +%s) - t0 ))s (background)" >> $summary ) &
    bg+=($!); continue
  fi
  [ -e $L/done/$name ] && { echo "SKIP $name (done in an earlier command)" | tee -a $summary; continue; }
  c=$(cmd_of $name); echo "=== $name (timeout ${to}s): $c"
  t0=$(date +%s); echo "=== $(date -u +%H:%M:%S) (timeout ${to}s)" >> $L/$name.log  # a rerun appends (and resumes)
  # TERM first: the trainer finishes its step and checkpoints, r1mega-eval's finished chunks are on disk; KILL 20 s on
  timeout -k 20 -s TERM $to bash -c "$c" >> $L/$name.log 2>&1; rc=$?
  pkill -9 -f 'sglang::' 2>/dev/null  # SGLang's schedulers outlive a killed parent and hold GPU memory
  [ $rc = 0 ] && mkdir -p $L/done && touch $L/done/$name
  echo "$name rc=$rc wall=$(( $(date +%s) - t0 ))s" | tee -a $summary
  quiet $L/$name.log | tail -n ${TAIL:-14} | cut -c1-600
  pack
done
for p in "${bg[@]}"; do wait $p; done
[ ${#bg[@]} -gt 0 ] && for spec in "$@"; do [ "${spec:0:1}" = "+" ] && { n=${spec%%:*}; n=${n:1}; echo "--- $n (background)"; quiet $L/$n.log | tail -n ${TAIL:-14} | cut -c1-600; }; done
pack
echo; tail -n +$mark $summary
