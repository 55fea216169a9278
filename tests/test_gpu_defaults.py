"""The 8-GPU presets map onto exactly the Megatron-Core settings of the best published H100
recipe for a ~1B Llama (Megatron-Bridge's Llama 3.2 1B): checked on CPU, without a GPU."""

import os
import subprocess

import pytest
import torch

from megatron_plugin.model.build import transformer_config_kwargs
from megatron_plugin.recipes.overrides import apply_overrides
from megatron_plugin.recipes.presets import get_preset
from megatron_plugin.training.optimizer import ddp_config_kwargs, optimizer_config_kwargs

from conftest import REPO


def _te_kwargs(cfg):
    return transformer_config_kwargs(cfg.build_config(), use_te=True)


@pytest.mark.parametrize("name", ["production_8gpu", "fast_8gpu"])
def test_8gpu_preset_maps_to_the_h100_recipe(name):
    cfg = get_preset(name)
    kwargs = _te_kwargs(cfg)
    expected = {
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
        "sequence_parallel": False,
        "bf16": True,
        "params_dtype": torch.bfloat16,
        "apply_rope_fusion": True,
        "bias_activation_fusion": True,
        "masked_softmax_fusion": True,
        "cross_entropy_loss_fusion": True,
        "cross_entropy_fusion_impl": "te",
        "gradient_accumulation_fusion": True,
        "persist_layer_norm": True,
        "recompute_granularity": None,
        "fp8": None,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "num_query_groups": 4,
        "layernorm_epsilon": 1e-5,
    }
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["activation_func"] is torch.nn.functional.silu
    assert ddp_config_kwargs(cfg, data_parallel=8) == {
        "grad_reduce_in_fp32": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "average_in_collective": True,
        "use_distributed_optimizer": True,
    }
    optim = optimizer_config_kwargs(cfg, data_parallel=8)
    assert optim["use_distributed_optimizer"] and optim["overlap_param_gather"] and optim["bf16"]
    assert cfg.train.manual_gc_interval == 100


def test_fusions_are_overridable_and_off_without_te():
    cfg, _ = apply_overrides(get_preset("production_8gpu"), ["fusion.rope=false", "fusion.cross_entropy=false"])
    kwargs = _te_kwargs(cfg)
    assert not kwargs["apply_rope_fusion"] and not kwargs["cross_entropy_loss_fusion"]
    assert kwargs["cross_entropy_fusion_impl"] == "native" and kwargs["masked_softmax_fusion"]
    local = transformer_config_kwargs(cfg.build_config(), use_te=False)
    assert not any(local[k] for k in ("apply_rope_fusion", "masked_softmax_fusion", "cross_entropy_loss_fusion",
                                      "gradient_accumulation_fusion", "persist_layer_norm"))
    # SwiGLU goes through Megatron's bias_swiglu_impl on both specs (a CPU kernel on the local one)
    assert local["bias_activation_fusion"]


def test_fp8_defaults_and_delayed_scaling():
    cfg, _ = apply_overrides(get_preset("production_8gpu"), ["precision.fp8=hybrid"])
    kwargs = _te_kwargs(cfg)
    assert (kwargs["fp8"], kwargs["fp8_recipe"], kwargs["fp8_param"]) == ("hybrid", "tensorwise", True)
    cfg, _ = apply_overrides(cfg, ["precision.fp8_recipe=delayed", "precision.fp8_param_gather=false"])
    kwargs = _te_kwargs(cfg)
    assert (kwargs["fp8_recipe"], kwargs["fp8_param"]) == ("delayed", False)


def test_tp2_override_keeps_the_rest():
    cfg, _ = apply_overrides(get_preset("production_8gpu"), ["parallel.tensor=2"])
    kwargs = _te_kwargs(cfg)
    assert kwargs["tensor_model_parallel_size"] == 2
    assert ddp_config_kwargs(cfg, data_parallel=4)["use_distributed_optimizer"]


def test_launcher_sets_the_recommended_environment(tmp_path):
    # A stand-in torchrun on PATH records the environment the launcher gives it.
    fake = tmp_path / "torchrun"
    fake.write_text("#!/usr/bin/env bash\nenv > \"$ENV_OUT\"\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_AVOID_RECORD_STREAMS", "PYTORCH_CUDA_ALLOC_CONF")}
    env.update(PATH=f"{tmp_path}:{env['PATH']}", ENV_OUT=str(tmp_path / "env.txt"))
    subprocess.run([os.path.join(REPO, "start_training.sh"), "--config", "production_8gpu", "--gpus", "8"],
                   env=env, check=True)
    seen = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    assert seen["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert seen["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert seen["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
