#!/usr/bin/env bash
# Launch a preset with torchrun: ./start_training.sh --config NAME --gpus N [options] [key=value ...]
#   --nodes N --node-rank R --master-addr HOST [--master-port P]   several nodes (one call per node)
#   --dry-run                                                      print the command, run nothing
# Everything else is passed to `python -m megatron_plugin.recipes.run` as overrides or flags.
set -euo pipefail

config="" gpus="" nodes=1 node_rank=0 master_addr="127.0.0.1" master_port=29500 dry_run=0
passthrough=()
usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; usage >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --gpus) need_value "$@"; gpus="$2"; shift 2 ;;
    --nodes) need_value "$@"; nodes="$2"; shift 2 ;;
    --node-rank) need_value "$@"; node_rank="$2"; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --master-port) need_value "$@"; master_port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) passthrough+=("$1"); shift ;;
  esac
done

[[ -n "$config" ]] || { echo "error: --config NAME is required (python -m megatron_plugin.recipes.run --list)" >&2; exit 2; }
[[ -n "$gpus" ]] || { echo "error: --gpus N is required (processes per node)" >&2; exit 2; }
for value in "$gpus" "$nodes" "$node_rank" "$master_port"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "error: '$value' is not a number" >&2; exit 2; }
done
(( node_rank < nodes )) || { echo "error: --node-rank $node_rank must be below --nodes $nodes" >&2; exit 2; }

# Settings from Megatron-Bridge's H100 performance guide: one CUDA work queue so communication
# kernels are issued in order, NCCL without record_stream, and an allocator that grows segments.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

cmd=(torchrun --nproc-per-node "$gpus" --nnodes "$nodes" --node-rank "$node_rank"
     --master-addr "$master_addr" --master-port "$master_port"
     -m megatron_plugin.recipes.run "$config" "parallel.gpus=$((gpus * nodes))" "${passthrough[@]}")

if (( dry_run )); then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
