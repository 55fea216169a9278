"""The library warnings we know to be expected, silenced in one place; every other one shows.

Megatron-Core warns at import and at model build time that Apex / Transformer Engine are absent
and that it falls back to its PyTorch implementations. On CPU (and on any machine without those
packages) that fallback is exactly what the package relies on, so the warnings say nothing the user
can act on; so do the deprecation notes torch gives for the APIs Megatron-Core calls. Each filter
matches one message from the modules it comes from; a new or changed warning still shows.
`install()` must run before Megatron-Core is imported (most of them fire at import).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpectedWarning:
    message: str  # regular expression matched at the start of the warning text
    module: str  # regular expression matched against the whole module name that warns
    category: type = UserWarning
    why: str = ""


# The module a warning is attributed to: Megatron-Core's, or on CPU the adapter's frame.
_MCORE_OR_CPU_MODE = r"megatron\.core\..*|megatron_plugin\.runtime\.cpu_mode"

EXPECTED: tuple[ExpectedWarning, ...] = (
    ExpectedWarning(
        r"Transformer Engine and Apex are not installed\. Falling back to ",
        r"megatron\.core\..*",
        why="optimizer, grad clipping and FSDP mixed precision use their PyTorch fallbacks on CPU",
    ),
    ExpectedWarning(
        r"Apex is not installed\. Falling back to Torch Norm",
        r"megatron\.core\.models\..*",
        why="the local layer spec uses torch's norms; RMSNorm needs nothing else",
    ),
    ExpectedWarning(
        r"full scope is deprecated\. Use empty cuda_graph_scope",
        r"megatron\.core\.transformer\.transformer_config",
        why="Megatron-Core 0.16's own TransformerConfig default (cuda_graph_scope='full') trips it",
    ),
    # Megatron-Core 0.16 calls torch.distributed APIs that torch 2.13 deprecates; the warnings are
    # attributed to torch's own modules or, on CPU, to the CPU adapter's TorchFunctionMode frame
    # (megatron_plugin.runtime.cpu_mode), through which every torch call passes.
    ExpectedWarning(
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        _MCORE_OR_CPU_MODE,
        why="the distributed optimizer's zero_grad reads .grad of its fp32 parameter-shard views",
    ),
    ExpectedWarning(
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger",
        category=FutureWarning,
        why="Megatron-Core's DDP and distributed optimizer use them (the package itself does not)",
    ),
    ExpectedWarning(
        r"`load_state_dict` is deprecated and will be removed in future versions",
        r"megatron\.core\.dist_checkpointing\..*",
        category=FutureWarning,
        why="dist_checkpointing's torch_dist loader calls torch.distributed.checkpoint.load_state_dict",
    ),
    ExpectedWarning(
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        _MCORE_OR_CPU_MODE + r"|torch\.distributed\..*",
        category=FutureWarning,
        why="dist_checkpointing's torch_dist format is built on torch's ShardedTensor (on resume)",
    ),
)


def install() -> None:
    """Add the filters (idempotent: warnings.filterwarnings drops an identical earlier entry)."""
    for expected in EXPECTED:
        warnings.filterwarnings("ignore", message=expected.message, category=expected.category,
                                module=expected.module)
