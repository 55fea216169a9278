"""Runs the real run CLI with one fault injected, for test_training.

    python tests/train_worker.py FAULT STEP PRESET [overrides...]

FAULT: nan        the loss of step STEP is NaN
       crash-save the process group is killed half way through the save at step STEP, after
                  the model part is written and before the optimizer part
       enospc     the save at step STEP fails with "No space left on device"
"""

import errno
import os
import signal
import sys

import torch


def main() -> int:
    fault, fault_step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    from megatron.core import dist_checkpointing

    from megatron_plugin.recipes.run import main as run_main
    from megatron_plugin.training import checkpoint, step

    if fault == "nan":
        calls = {"n": 0}
        real_loss = step._loss_func

        def loss_func(loss_mask, output_tensor):
            loss_sum, num_tokens, report = real_loss(loss_mask, output_tensor)
            calls["n"] += torch.is_grad_enabled()  # training micro-batches only, not validation
            # micro-batches per step = global / micro batch (DP=1 here)
            if calls["n"] > (fault_step - 1) * 2:
                loss_sum = loss_sum * float("nan")
                report = {key: value * float("nan") for key, value in report.items()}
            return loss_sum, num_tokens, report

        step._loss_func = loss_func
    else:
        real_save = dist_checkpointing.save
        real_checkpointer_save = checkpoint.Checkpointer.save
        current = {"step": None}

        def checkpointer_save(self, state, at_step, *args, **kwargs):
            current["step"] = at_step
            return real_checkpointer_save(self, state, at_step, *args, **kwargs)

        def save(state_dict, directory, *args, **kwargs):
            if current["step"] == fault_step:
                if fault == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
                if fault == "crash-save" and directory.endswith("optimizer"):
                    # A crash takes the checkpoint writer's helper processes down too.
                    os.killpg(os.getpgid(0), signal.SIGKILL)
            return real_save(state_dict, directory, *args, **kwargs)

        checkpoint.Checkpointer.save = checkpointer_save
        dist_checkpointing.save = save
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
