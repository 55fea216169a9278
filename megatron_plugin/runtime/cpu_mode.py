"""CPU mode: the few adaptations that let Megatron-Core's GPTModel train on a CPU.

Megatron-Core assumes CUDA in a handful of places. With CUDA absent we redirect exactly those:

1. `torch.cuda.current_device()` -> the CPU device (Megatron asks for it to place tensors).
2. CUDA RNG state (`torch.cuda.get_rng_state/set_rng_state/manual_seed` and Megatron-Core's
   private `tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`) -> the CPU
   generator, so the tensor-parallel RNG tracker forks the CPU generator instead. That makes
   the tracker's "CPU RNG state changed within GPU RNG context" warning fire on every fork,
   which is expected here and silenced.
3. `get_default_causal_mask` builds its mask on "cuda"; both modules that reference it get a
   CPU version.
4. `torch.cuda.synchronize()` (checkpoint writer, timers) -> no-op.
5. Literal `device="cuda"` tensors, `Tensor.cuda()`, and the `torch.cuda.FloatTensor` type-name
   checks in `clip_grads`: one `TorchFunctionMode` maps CUDA devices to CPU and reports CUDA
   type names for CPU tensors. It sees every torch call made from Python (about 2,500 in a
   training step of the 8-layer benchmark model, ~1.6 us each: a few milliseconds a step), so it
   stays global rather than being switched on around the few call sites that need it.
6. Megatron's gradient-accumulation fusion (weight gradients accumulated by the GEMM straight
   into DDP's fp32 `main_grad` buffer instead of a fresh gradient tensor that a hook then adds)
   comes from a CUDA extension; `fuse_wgrad_accumulation` provides it with `addmm_` for a model
   wrapped in Megatron's DDP.
7. Megatron's stand-in for Apex's `multi_tensor_scale` (gradient clipping, fp16 grad copies)
   is `dst.copy_(src * scale)`: a temporary and two passes per tensor; on CPU tensors it is done
   in one pass (in place when source and destination are the same tensor).
8. `use_fused_adam`: Megatron builds `torch.optim.AdamW` with its defaults, which on CPU is the
   per-tensor loop of a dozen element-wise passes; torch's fused CPU AdamW does one pass.
9. Inference (`megatron.core.inference`, used by `megatron_plugin.generate`): the static KV
   cache and the sampler's generator are allocated on `torch.cuda.current_device()` (covered by
   1.); the pipeline-parallel send / receive / broadcast helpers of
   `inference.communication_utils` assert `tensor.is_cuda` on what they pass between stages,
   which gloo passes as CPU tensors: the check becomes "a tensor is there".
10. Megatron's RoPE, SwiGLU and torch RMSNorm of the local layer spec take the CPU kernels of
   `megatron_plugin.model.fused_ops` for CPU tensors (`fused_ops.install`).
11. `torch.cuda.current_stream()` (megatron-core 0.19's DDP waits on it before each gradient
   reduction) -> a stream with nothing to wait for.

Everything is switched on by `enable()` only when CUDA is absent, and only for the
megatron-core versions listed in `TESTED_MEGATRON_CORE`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

# megatron-core releases this module was tested with (major.minor.patch prefixes).
TESTED_MEGATRON_CORE = ("0.16.0", "0.16.1", "0.19.2")

_enabled = False
_mode: "_CudaToCpuMode | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() results around as ints; a bare int is a CUDA
    # ordinal to torch. (bool is an int subclass but never a device.)
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to the CPU and answers CUDA type names for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            return name if name is not None else func(*args)
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _CpuWgradAccumulation:
    """The two entry points of Megatron's `fused_weight_gradient_mlp_cuda` extension on CPU:
    main_grad += grad_output^T @ input, accumulated by the GEMM itself (beta = 1)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
        if total_input.dtype != main_grad.dtype:  # bf16 / fp16 activations, fp32 grad buffer
            total_input, grad_output = total_input.to(main_grad.dtype), grad_output.to(main_grad.dtype)
        main_grad.addmm_(grad_output.t(), total_input)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
        main_grad.addmm_(grad_output.t(), total_input)


def _cpu_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src is dst:
            dst.mul_(scale)
        elif dst.device.type == "cpu" and src.device.type == "cpu" and dst.shape == src.shape:
            torch.mul(src, scale, out=dst)
        else:
            dst.copy_(src * scale)


def fuse_wgrad_accumulation(model_chunks: list) -> int:
    """Switch Megatron's tensor-parallel linear layers of DDP-wrapped `model_chunks` to gradient-
    accumulation fusion (their weights have `main_grad`). Returns the number of layers switched;
    0 unless CPU mode is on."""
    if not _enabled:
        return 0
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    switched = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.weight is not None \
                    and hasattr(module.weight, "main_grad"):
                module.gradient_accumulation_fusion = True
                switched += 1
    return switched


def use_fused_adam(optimizer) -> int:
    """Make the torch Adam/AdamW optimizers inside a Megatron optimizer use torch's fused CPU
    kernel (same update, one pass per parameter). Returns the number of torch optimizers changed;
    0 unless CPU mode is on."""
    if not _enabled:
        return 0
    changed = 0
    for megatron_opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(megatron_opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if not params or any(p.device.type != "cpu" or not p.dtype.is_floating_point for p in params):
            continue
        if any(group.get("differentiable") or group.get("capturable") for group in inner.param_groups):
            continue
        for group in inner.param_groups:
            group["foreach"] = False
            group["fused"] = True
        inner.defaults["foreach"] = False
        inner.defaults["fused"] = True
        inner._step_supports_amp_scaling = True
        changed += 1
    return changed


def _tensor_present(tensor) -> None:
    # Megatron's inference communication helpers assert `tensor.is_cuda`; on CPU (gloo) the
    # tensors they send are CPU tensors, so only the presence half of the check holds.
    assert tensor is not None


class _NullStream:
    """Stands in for `torch.cuda.current_stream()`: megatron-core 0.19's DDP bucket group waits on
    it for CUDA-graph weight-gradient events (none on CPU) before every gradient reduction."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_NULL_STREAM = _NullStream()


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_rng_get(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int, *args, **kwargs) -> None:
    # The CPU generator only: torch.manual_seed would call back into torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(seed)


class _QuietForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def check_megatron_core_version() -> str:
    import megatron.core

    version = megatron.core.__version__
    if not version.startswith(TESTED_MEGATRON_CORE):
        raise RuntimeError(
            f"CPU mode was tested with megatron-core {', '.join(TESTED_MEGATRON_CORE)} and this "
            f"environment has {version}. Install a tested release "
            "(pip install 'megatron-core>=0.16.0,<0.17' or 'megatron-core==0.19.2') or run on a CUDA machine."
        )
    return version


def enable() -> bool:
    """Switch CPU mode on if CUDA is absent. Returns True if CPU mode is (now) active."""
    global _enabled, _mode
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False
    version = check_megatron_core_version()

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.inference.communication_utils as inference_comm
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as megatron_optimizer
    import megatron.core.tensor_parallel.layers as tp_layers
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.utils as transformer_utils

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.get_rng_state = _cpu_rng_get
    torch.cuda.set_rng_state = _cpu_rng_set
    torch.cuda.manual_seed = _cpu_manual_seed
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NULL_STREAM
    tp_random._get_cuda_rng_state = _cpu_rng_get
    tp_random._set_cuda_rng_state = _cpu_rng_set
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    logging.getLogger(tp_random.__name__).addFilter(_QuietForkWarning())
    inference_comm._is_cuda = _tensor_present
    from megatron.core.utils import local_multi_tensor_scale

    for module in (clip_grads, megatron_optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _cpu_multi_tensor_scale
    if not tp_layers._grad_accum_fusion_available:
        tp_layers.fused_weight_gradient_mlp_cuda = _CpuWgradAccumulation
        tp_layers._grad_accum_fusion_available = True

    from megatron_plugin.model import fused_ops

    fused_ops.install()
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _enabled = True
    logger.info("CUDA not available: CPU mode on (megatron-core %s, gloo backend)", version)
    return True


@contextlib.contextmanager
def suspended():
    """Run a block without the CUDA->CPU TorchFunctionMode (e.g. a plain PyTorch model timed beside
    ours); the function patches stay. A no-op when CPU mode is off."""
    if _mode is None:
        yield
        return
    with _mode_off():
        yield


@contextlib.contextmanager
def redirect_paused():
    """Run a block of torch calls that need none of the CUDA->CPU redirections of the
    TorchFunctionMode (5. above) without it, so that they do not each pass through Python: e.g. a
    built model's forward, whose devices come from the patched `torch.cuda.current_device()`.
    Unlike `suspended`, it nests, and it takes the mode off only while it is the innermost function
    mode (another mode entered above it stays and the block runs with both). A no-op when CPU
    mode is off."""
    depth = torch._C._len_torch_function_stack()
    if _mode is None or depth == 0 or torch._C._get_function_stack_at(depth - 1) is not _mode:
        yield
        return
    with _mode_off():
        yield


@contextlib.contextmanager
def _mode_off():
    """The TorchFunctionMode taken off for a block and put back after it."""
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()
