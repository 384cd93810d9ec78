"""bench/gpu_check.py on a machine without a GPU: it parses, validates the specs of its checks, and
refuses with one clear line instead of failing halfway. (Its checks themselves need CUDA: they run
when a GPU machine is lent, and their output goes to bench/README.md.)"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)


def test_a_dry_run_lists_every_check():
    proc = gpu_check("--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpu_check: dry run: would run vllm-generate, vllm-score, train-zero2, train-zero3, merge-cuda, " \
           "faiss-gpu on builtin://smollm2-135m-instruct" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_and_exits_2():
    proc = gpu_check()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == \
        "gpu_check: no GPU: torch.cuda.is_available() is False; nothing was checked"
