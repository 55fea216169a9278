"""The library warnings we know to be expected, silenced in one place; every other one shows.

Megatron-Core warns at import and at model build time that Apex / Transformer Engine are absent
and that it falls back to its PyTorch implementations. On CPU (and on any machine without those
packages) that fallback is exactly what the package relies on, so the warnings say nothing the user
can act on; so do the deprecation notes torch gives for the APIs Megatron-Core calls. Each filter
matches one message from the modules it comes from; a new or changed warning still shows.
`install()` must run before Megatron-Core is imported (most of them fire at import).
"""

from __future__ import annotations

import logging
import re
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
        r"full scope is deprecated\. Use empty cuda_graph_(scope|modules)",
        r"megatron\.core\.transformer\.transformer_config",
        why="Megatron-Core's own TransformerConfig default (0.16: cuda_graph_scope='full', "
            "0.19: cuda_graph_modules='full') trips it",
    ),
    ExpectedWarning(
        r"MimoModelConfig is experimental and still under active development",
        r"megatron\.core\.models\.mimo\..*",
        why="megatron-core 0.19's get_megatron_optimizer imports the MIMO model to check for one",
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
    # megatron-core 0.19 reads a checkpoint's common state (a ShardedObject in the .distcp files)
    # with torch.distributed.checkpoint.load(..., no_dist=True), on resume and in the export.
    ExpectedWarning(
        r"The argument order of load has been changed",
        r"torch\.distributed\.checkpoint\..*",
        why="dist_checkpointing 0.19's load_common_state_dict passes the state dict positionally",
    ),
    ExpectedWarning(
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
        r"load in a single process",
        r"torch\.distributed\.checkpoint\..*",
        why="dist_checkpointing 0.19's load_common_state_dict reads the common state with no_dist=True",
    ),
)


@dataclass(frozen=True)
class ExpectedLogRecord:
    message: str  # regular expression matched at the start of the record's message
    logger: str  # the logger (module) that logs it
    why: str = ""


# Log records (not warnings) of megatron-core 0.19 that say nothing the user of this package can
# act on; dropped by a filter on the one logger that emits each.
EXPECTED_LOG_RECORDS: tuple[ExpectedLogRecord, ...] = (
    ExpectedLogRecord(
        r"GPTModel IS DEPRECATED",
        "megatron.core.models.gpt.gpt_model",
        why="0.19 logs it for every GPTModel built; HybridModel is the successor (a later migration)",
    ),
    ExpectedLogRecord(
        r"DistributedDataParallel: full_param_layout not provided",
        "megatron.core.distributed.distributed_data_parallel",
        why="DDP computes the layout itself, as get_megatron_optimizer expects it to",
    ),
    ExpectedLogRecord(
        r"MCore's async save is deprecated",
        "megatron.core.dist_checkpointing.strategies.torch",
        why="0.19's synchronous torch_dist save runs the in-tree writer and logs this on the first save",
    ),
    ExpectedLogRecord(
        r"load_common is deprecated",
        "megatron.core.dist_checkpointing.strategies.common",
        why="reading a checkpoint written by megatron-core <= 0.18 (its common.pt)",
    ),
)


class _DropExpected(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self._patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self._patterns)


_log_filters_installed = False


def install() -> None:
    """Add the filters (idempotent: warnings.filterwarnings drops an identical earlier entry)."""
    global _log_filters_installed
    for expected in EXPECTED:
        warnings.filterwarnings("ignore", message=expected.message, category=expected.category,
                                module=expected.module)
    if not _log_filters_installed:
        by_logger: dict[str, list[str]] = {}
        for record in EXPECTED_LOG_RECORDS:
            by_logger.setdefault(record.logger, []).append(record.message)
        for name, patterns in by_logger.items():
            logging.getLogger(name).addFilter(_DropExpected(patterns))
        _log_filters_installed = True
