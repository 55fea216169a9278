"""Megatron-Core checkpoint <-> Hugging Face Llama.

- `export_checkpoint(checkpoint, output, dtype="bf16")`: RUN/checkpoints[/iter_N] (any TP/PP/DP
  layout) -> an HF LlamaForCausalLM folder, converted one tensor at a time.
- `import_hf(hf_dir, output, tensor_parallel=1)`: an HF Llama folder -> a checkpoint to continue
  pretraining from.
- `verify_export(checkpoint, hf_dir)`: max |logit difference| between the two models on CPU.

The CLI is `python -m megatron_plugin.export` (see docs/export.md).
"""

from megatron_plugin.checkpoint_layout import CheckpointError
from megatron_plugin.export.from_hf import import_hf
from megatron_plugin.export.hf_config import UnsupportedModelError
from megatron_plugin.export.to_hf import export_checkpoint
from megatron_plugin.export.verify import VerifyResult, verify_export

__all__ = [
    "CheckpointError",
    "UnsupportedModelError",
    "VerifyResult",
    "export_checkpoint",
    "import_hf",
    "verify_export",
]
