#!/usr/bin/env bash
# Train with one command: bash run.sh packed|unpacked|lora [--key value ...]
# GPUs: the Qwen3-30B-A3B recipe on every visible GPU. No GPU: the tiny model on CPU processes.
# NUM_PROCESSES overrides the process count; extra options override the recipe.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-packed}
case "$mode" in
  packed|unpacked|lora) shift || true ;;
  -h|--help) sed -n 2,4p "$0"; exit 0 ;;
  --*) mode=packed ;;  # options alone: the default mode, as with no argument
  *) echo "run.sh: unknown mode '$mode'; use packed, unpacked or lora (before any --option)" >&2; exit 2 ;;
esac
gpus=0  # without nvidia-smi there is no GPU to count, and importing torch to say so takes seconds
if command -v nvidia-smi >/dev/null; then
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
if [ "$gpus" -gt 0 ]; then
  nproc=${NUM_PROCESSES:-$gpus}
  recipe=qwen_moe_ft/recipes/qwen3-30b-a3b-$mode.yaml
  # one GPU holds all 48 layers' frozen weights for LoRA only with activation checkpointing
  if [ "$mode" = lora ] && [ "$nproc" -eq 1 ]; then recipe=qwen_moe_ft/recipes/qwen3-30b-a3b-lora-1gpu.yaml; fi
  launch=(accelerate --num_processes "$nproc" --num_machines 1 --mixed_precision no --dynamo_backend no)
else
  recipe=qwen_moe_ft/recipes/tiny-$mode.yaml
  nproc=${NUM_PROCESSES:-2}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # Accelerate's own CPU multi-process mode needs MPI; torchrun gives DeepSpeed plain gloo processes.
  launch=(torchrun --standalone --nproc_per_node "$nproc")
fi
# Options, the parallel sizes against the process count, then the data, checked once here, before any process
# starts: a typo, an --ep-size that does not divide the processes or a bad row is one message, not one per rank.
WORLD_SIZE=$nproc python3 -m qwen_moe_ft.cli --config "$recipe" "$@" || exit $?
echo "run.sh: $mode, $nproc process(es), recipe $recipe"
# qwen_moe_ft.launch: the launcher's code, without its traceback where a process fails or a signal stops the run
exec python3 -m qwen_moe_ft.launch "${launch[@]}" qwen_moe_ft/train.py --config "$recipe" "$@"
