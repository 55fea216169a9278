"""Worker for test_tensor_parallel: logits of one set of weights at the current TP size.

    python tests/tp_logits_worker.py save CKPT_DIR OUT.pt      (TP=1: init weights, save them)
    torchrun --nproc-per-node 2 tests/tp_logits_worker.py load CKPT_DIR OUT.pt   (TP=2 shards)

The test calls `main("save", ...)` in its own process (one process, nothing to start).
"""

import os
import sys

import torch
import torch.distributed as dist

from megatron_plugin.config import BuildConfig, ParallelConfig, PrecisionConfig
from megatron_plugin.model import build_gpt_model
from megatron_plugin.recipes.presets import tiny_model
from megatron_plugin.runtime.distributed import init_distributed, shutdown


def main(mode: str, ckpt_dir: str, out: str) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    init_distributed(ParallelConfig(tensor=tp), seed=7)
    model_cfg = tiny_model(vocab_size=500, seq=32)
    model = build_gpt_model(BuildConfig(model_cfg, PrecisionConfig(dtype="fp32"), ParallelConfig(tensor=tp)))
    if mode == "save":
        dist_checkpointing.save({"model": model.sharded_state_dict()}, ckpt_dir)
    else:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
        model.load_state_dict(loaded["model"])
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 32), generator=generator)
    positions = torch.arange(32).unsqueeze(0).expand(2, -1)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, None)  # [b, s, vocab / tp]
        logits = gather_from_tensor_model_parallel_region(logits.contiguous())
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(logits[..., : model_cfg.vocab_size].clone(), out)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
