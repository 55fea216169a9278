"""`python -m megatron_plugin.recipes.run NAME [key=value ...]`: resolve a preset, validate, train.

Flags: --list (presets), --show (resolved config only), --plan [--json] [--mfu 0.4] [--gpu h100|cpu].
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


from megatron_plugin.config import RunConfig
from megatron_plugin.errors import UserError, report_user_error
from megatron_plugin.recipes.overrides import apply_overrides
from megatron_plugin.recipes.plan import CPU, format_plan, make_plan
from megatron_plugin.recipes.presets import CPU_PRESETS, PRESETS, get_preset
from megatron_plugin.recipes.summary import run_summary
from megatron_plugin.recipes.validate import validate
from megatron_plugin.runtime import expected_warnings
from megatron_plugin.runtime.peak import GPU_PEAKS

logger = logging.getLogger("megatron_plugin.run")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_plugin.recipes.run",
        description="Train a preset with Megatron-Core; overrides use Hydra's key=value grammar.",
    )
    parser.add_argument("preset", nargs="?", default="smoke", help="preset name (default: smoke)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 parallel.tensor=2")
    parser.add_argument("--list", action="store_true", help="list presets and exit")
    parser.add_argument("--show", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--plan", action="store_true", help="print the cost of the run without training")
    parser.add_argument("--json", action="store_true", help="with --plan: one JSON object")
    parser.add_argument("--mfu", type=float, default=0.40, help="with --plan: assumed MFU (default 0.40)")
    parser.add_argument("--gpu", choices=sorted(GPU_PEAKS) + [CPU],
                        help="with --plan: GPU type, or cpu for this machine's measured CPU peak "
                             "(default: cpu for the CPU presets, else h100)")
    parser.add_argument("--preprocess-cores", type=int,
                        help="with --plan: CPU cores for the preprocessing estimate (default: this "
                             "machine's for a CPU plan, else 64)")
    return parser


def resolve(preset: str, overrides: list[str]) -> tuple[RunConfig, list]:
    return apply_overrides(get_preset(preset), overrides)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # Megatron-Core logs a great deal at INFO; keep its warnings.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


def with_base_model(cfg: RunConfig) -> RunConfig:
    """checkpoint.base_preset with checkpoint.load unset: train that preset in RUN/base first (a
    finished one is not trained again) and start from its weights."""
    import dataclasses

    from megatron_plugin.training.loop import train

    if cfg.checkpoint.load or not cfg.checkpoint.base_preset:
        return cfg
    base = get_preset(cfg.checkpoint.base_preset)
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, dir=os.path.join(cfg.run_dir, "base")))
    validate(base, world_size=_world_size())
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("base model first: preset %s in %s (checkpoint.base_preset)", cfg.checkpoint.base_preset,
                    base.run_dir)
    train(base)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=base.run_dir))


def main(argv: list[str] | None = None) -> int:
    # Intermixed: overrides may come after the flags (`smoke --plan run.dir=x`).
    args = _parser().parse_intermixed_args(argv)
    expected_warnings.install()  # before Megatron-Core is imported: it warns at import
    if args.list:
        for name, fn in sorted(PRESETS.items()):
            print(f"{name:18s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    try:
        cfg, applied = resolve(args.preset, args.overrides)
        if args.plan:
            validate(cfg, world_size=cfg.parallel.gpus, check_data=False, cuda=True)
            gpu = args.gpu or (CPU if args.preset in CPU_PRESETS else "h100")
            cores = args.preprocess_cores or ((os.cpu_count() or 1) if gpu == CPU else 64)
            plan = make_plan(cfg, mfu=args.mfu, gpu=gpu, preprocess_cores=cores)
            print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
            return 0
        if args.show:
            print(cfg.to_yaml())
            return 0
        _setup_logging()
        rank0 = int(os.environ.get("RANK", "0")) == 0
        for item in applied:
            if item.alias and rank0:
                logger.info("%s is the Hugging Face Trainer name of %s: set %s", item.alias, item.key, item.key)
        validate(cfg, world_size=_world_size())
        if rank0:  # the training loop writes config.yaml once it owns the run directory
            logger.info("%s", run_summary(cfg, _world_size(), os.path.join(cfg.run_dir, "config.yaml")))
        from megatron_plugin.runtime.distributed import shutdown
        from megatron_plugin.training.loop import train

        try:
            train(with_base_model(cfg))
        except UserError as error:  # printed by each rank that found it, unless all found the same
            return report_user_error(error, every_rank=not error.same_on_every_rank)
        finally:
            shutdown()
    except UserError as error:  # the config: every rank resolves and validates the same one
        return report_user_error(error, every_rank=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
