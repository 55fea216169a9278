"""Tensor parallelism is real: TP=2 shards of one set of weights give TP=1's logits."""

import torch

import tp_logits_worker
from conftest import run_python


def test_tp2_logits_equal_tp1(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tp_logits_worker.main("save", str(ckpt), str(tmp_path / "tp1.pt"))  # TP=1: in this process
    run_python(["tests/tp_logits_worker.py", "load", str(ckpt), str(tmp_path / "tp2.pt")], nproc=2)
    tp1 = torch.load(tmp_path / "tp1.pt")
    tp2 = torch.load(tmp_path / "tp2.pt")
    assert tp1.shape == tp2.shape == (2, 32, 500)
    assert tp1.abs().max() > 0.1  # real logits, not zeros
    torch.testing.assert_close(tp2, tp1, rtol=1e-4, atol=1e-4)
