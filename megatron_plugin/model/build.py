"""ModelConfig -> Megatron-Core TransformerConfig + GPTModel."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_plugin.config import BuildConfig, ModelConfig

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises more than ImportError when its CUDA libraries are missing
        return False
    return torch.cuda.is_available()


def uses_transformer_engine(model: ModelConfig) -> bool:
    if model.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine needs Transformer Engine and a CUDA "
                "GPU; install the [gpu] extra on a GPU machine or set model.transformer_impl=local"
            )
        return True
    return model.transformer_impl == "auto" and transformer_engine_available()


def transformer_config_kwargs(build: BuildConfig, use_te: Optional[bool] = None) -> dict:
    """The arguments of Megatron-Core's TransformerConfig for a Llama-style decoder. `use_te`
    (default: detected) says whether the Transformer Engine spec runs, which is what the fused
    kernels need; kept apart from the TransformerConfig so the mapping can be checked anywhere."""
    model, parallel, precision, fusion = build.model, build.parallel, build.precision, build.fusion
    if use_te is None:
        use_te = uses_transformer_engine(model)
    recompute = build.train.recompute
    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,
        params_dtype=precision.torch_dtype,
        pipeline_dtype=precision.torch_dtype,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe if precision.fp8 else "delayed",
        fp8_param=precision.fp8_param_gather and precision.fp8 is not None,
        apply_rope_fusion=use_te and fusion.rope,
        # On the local spec this routes SwiGLU through Megatron's `bias_swiglu_impl`, which
        # model/fused_ops.py serves with a CPU kernel (Megatron's own jit-fused one on CUDA).
        bias_activation_fusion=fusion.swiglu,
        masked_softmax_fusion=use_te and fusion.masked_softmax,
        cross_entropy_loss_fusion=use_te and fusion.cross_entropy,
        cross_entropy_fusion_impl="te" if use_te and fusion.cross_entropy else "native",
        gradient_accumulation_fusion=use_te and fusion.grad_accumulation,
        persist_layer_norm=use_te and fusion.persist_layer_norm,
        bias_dropout_fusion=use_te,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        variable_seq_lengths=False,
    )


def transformer_config(build: BuildConfig, use_te: Optional[bool] = None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = transformer_config_kwargs(build, use_te)
    if kwargs["gradient_accumulation_fusion"] and not _has_fused_wgrad_kernel():
        logger.warning("fusion.grad_accumulation is on but apex's fused_weight_gradient_mlp_cuda is not "
                       "installed (Megatron-Core's output layer needs it): training without it. NGC PyTorch "
                       "containers ship apex; set fusion.grad_accumulation=false to silence this")
        kwargs["gradient_accumulation_fusion"] = False
    return TransformerConfig(**kwargs)


def _has_fused_wgrad_kernel() -> bool:
    """Megatron-Core's non-TE output layer accumulates weight gradients into main_grad with apex's
    `fused_weight_gradient_mlp_cuda` and refuses gradient_accumulation_fusion without it (NGC
    containers ship apex; a pip install of TE alone does not)."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def layer_spec(use_te: bool):
    """TE's layer spec on CUDA with Transformer Engine; the local spec with SDPA otherwise (on
    CPU, CPU mode routes its RoPE, SwiGLU and RMSNorm through model/fused_ops.py)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron_plugin.model.attention import SDPAttention, self_attention_class

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.module = self_attention_class()
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_gpt_model(build: BuildConfig, pre_process: Optional[bool] = None, post_process: Optional[bool] = None):
    """Build this rank's part of the GPTModel (needs Megatron's parallel state initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    model, parallel = build.model, build.parallel
    use_te = uses_transformer_engine(model)  # one decision for the config's fusions and the layer spec
    config = transformer_config(build, use_te)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=model.padded_vocab_size(parallel.tensor),
        max_sequence_length=model.max_seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        parallel_output=True,
    )
    device = torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")
    return gpt.to(device)
