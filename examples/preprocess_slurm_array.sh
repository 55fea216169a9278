#!/bin/bash
# Preprocess a corpus larger than one machine: one Slurm array task per shard, then one merge.
#
#   sbatch --array=0-63 examples/preprocess_slurm_array.sh      # 64 shards
#   # when every task has finished (or chain it: sbatch --dependency=afterok:<jobid> ...):
#   python -m megatron_plugin.preprocess merge --output-prefix "$OUT/corpus_text_document" \
#       "$OUT/corpus_text_document-shard-*-of-00064"
#
# The tokenizer is trained once beforehand, on a bounded sample, so every shard uses the same one:
#   python -m megatron_plugin.preprocess train-tokenizer --input "$INPUT" --model-prefix "$OUT/tokenizer" \
#       --vocab-size 32000
#
# Each task takes a deterministic, size-balanced, contiguous run of the sorted input files, so
# merging shards 0..N-1 gives exactly the bytes of a single run. A task that is re-submitted skips
# its shard when the output is already complete and verified (manifest + sizes + index checksum),
# so requeued or failed arrays can simply be submitted again. Instead of merging, the training
# config may also list the shard prefixes directly.
#SBATCH --job-name=preprocess
#SBATCH --cpus-per-task=32
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=logs/preprocess-%A_%a.out
set -euo pipefail

INPUT=${INPUT:-/data/corpus/*.jsonl.zst}     # files, directories or globs (quote globs)
OUT=${OUT:-/data/megatron/corpus}            # output prefix
TOKENIZER=${TOKENIZER:-/data/megatron/tokenizer.model}
NUM_SHARDS=${NUM_SHARDS:-${SLURM_ARRAY_TASK_COUNT:-1}}
SHARD=${SLURM_ARRAY_TASK_ID:-0}

python -m megatron_plugin.preprocess \
    --input "$INPUT" \
    --output-prefix "$OUT" \
    --tokenizer-model "$TOKENIZER" \
    --append-eod \
    --workers "${SLURM_CPUS_PER_TASK:-0}" \
    --num-shards "$NUM_SHARDS" --shard-index "$SHARD" \
    --verify 100 \
    --no-progress
