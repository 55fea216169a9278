"""Check an export against the checkpoint it came from: logits of our Megatron model (rebuilt at
TP=1 from the checkpoint, fp32) vs `transformers`' LlamaForCausalLM loaded from the folder (fp32,
CPU) on a few token sequences."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_plugin.export.checkpoint import MegatronCheckpoint, dcp_errors

logger = logging.getLogger(__name__)

# Largest max |logit difference| accepted per export dtype: fp32 differs only by summation
# order; fp16/bf16 round every weight, which moves logits of an O(1)-scale model by ~1e-2..1e-1.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 3e-1}


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    sequences: int
    seq_length: int


def load_megatron_model(ckpt: MegatronCheckpoint):
    """Our GPTModel at TP=1, fp32, with the checkpoint's weights (needs `megatron_session()`)."""
    from megatron.core import dist_checkpointing

    from megatron_plugin.export.session import build_single_process_model

    model = build_single_process_model(ckpt.model_config, ckpt.padded_vocab_size, dtype="fp32")
    with dcp_errors(f"cannot load the model from {ckpt.dir}"):
        sharded = model.sharded_state_dict(prefix=ckpt.key_prefix)
        state = dist_checkpointing.load({"model": sharded}, str(ckpt.dir))
    prefix = len(ckpt.key_prefix)
    model.load_state_dict({key[prefix:]: value for key, value in state["model"].items()})
    return model.eval()


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    device = next(model.parameters()).device  # the model may live on the GPU, the tokens on the CPU
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, None)
    return logits[..., :vocab_size].float().cpu()


@torch.no_grad()
def megatron_greedy(model, prompt: torch.Tensor, new_tokens: int, vocab_size: int) -> torch.Tensor:
    """Greedy decoding without a KV cache (the whole sequence each step): slow but simple."""
    tokens = prompt
    for _ in range(new_tokens):
        next_token = megatron_logits(model, tokens, vocab_size)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def sample_tokens(vocab_size: int, sequences: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (sequences, seq_length), generator=gen)


def load_hf_model(hf_dir: str | os.PathLike):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def verify_export(
    checkpoint: str | os.PathLike,
    hf_dir: str | os.PathLike,
    sequences: int = 3,
    seq_length: Optional[int] = None,
) -> VerifyResult:
    """Max |logit difference| between the checkpoint's model and the exported HF model."""
    from megatron_plugin.export.session import megatron_session

    with megatron_session():
        ckpt = MegatronCheckpoint(checkpoint)
        config = ckpt.model_config
        length = seq_length or min(64, config.max_seq_length)
        tokens = sample_tokens(config.vocab_size, sequences, length)
        ours = megatron_logits(load_megatron_model(ckpt), tokens, config.vocab_size)
    hf_model = load_hf_model(hf_dir)
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens).logits.float()
    if theirs.shape != ours.shape:
        raise RuntimeError(f"logit shapes differ: ours {tuple(ours.shape)}, transformers {tuple(theirs.shape)}")
    return VerifyResult(
        max_abs_diff=(ours - theirs).abs().max().item(),
        max_abs_logit=ours.abs().max().item(),
        sequences=sequences,
        seq_length=length,
    )
