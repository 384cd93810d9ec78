"""Every CUDA path of the stages on one GPU machine: the check to run when a GPU is lent.

    python -m bench.gpu_check [--scratch DIR] [--dry-run]

On the real builtin://smollm2-135m-instruct: vLLM generation and judge scoring through the
project's engine (stages/models/engines.py); a LoRA train at DeepSpeed ZeRO-2 and at ZeRO-3, the
train stage launched as tests/test_train.py launches it (`python -m selfalign.stages train`, under
torchrun with 2 ranks when 2 GPUs are visible); the merge stage on CUDA on the ZeRO-2 adapter; and
exact k-NN with faiss on the GPU (stages/vectors/knn.py). One line per check: its rate and the peak
GPU memory in use on GPU 0, sampled over the check (cudaMemGetInfo counts every process: vLLM's
engine and the train ranks run in child processes). Exits 1 naming the checks that failed; without
CUDA it says so and exits 2. CI never runs it; tests/test_gpu_check.py runs the CPU paths.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import T0_QUESTIONS, header, line

from selfalign.operator.spec import Sampling, parse_spec
from selfalign.stages.runtime import storage

MODEL = "smollm2-135m-instruct"
CHECKS = ("vllm-generate", "vllm-score", "train-zero2", "train-zero3", "merge-cuda", "faiss-gpu")
PROMPTS = 256
WORDS = ("stone", "river", "apple", "cloud", "tiger", "paper", "glass", "music")
EXIT_NO_GPU = 2


def spec_dict(model_dir: Path, zero: int) -> dict:
    """A one-round run of the real model; train settings of a short LoRA fine-tune."""
    return {
        "recipe": "isheep", "rounds": 1, "model": {"base": model_dir.as_uri()},
        "seeds": "file:///unused/seeds.jsonl", "storage": {"uri": "file:///unused"},
        "coverage": {"reference": "file:///unused/reference.jsonl"},
        "engine": {"maxModelLen": 2048, "gpuMemoryUtilization": 0.5},
        "train": {"zeroStage": zero, "loraRank": 16, "loraAlpha": 32, "loraDropout": 0.0,
                  "targetModules": ["all-linear"], "learningRate": 2e-4, "scheduler": "constant",
                  "warmupRatio": 0.0, "epochs": 2, "perDeviceBatchSize": 8,
                  "gradientAccumulationSteps": 1, "maxSeqLength": 512, "checkpointSteps": 1000},
    }


def spec(model_dir: Path, zero: int):
    return parse_spec(spec_dict(model_dir, zero))


class PeakMemory:
    """Largest device-wide memory in use on GPU 0 while the block runs (sampled every 50 ms)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _sample(self):
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(0)
            self.peak = max(self.peak, total - free)
            time.sleep(0.05)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def questions() -> list[str]:
    with T0_QUESTIONS.open() as rows:
        return [json.loads(row)["instruction"] for _, row in zip(range(PROMPTS), rows)]


def check_vllm(model_dir: Path) -> tuple[str, str]:
    from selfalign.stages.models.engines import open_engine

    engine = open_engine(model_dir, spec(model_dir, 0), gpus=1, seed=0)
    try:
        chats = [[{"role": "user", "content": q}] for q in questions()]
        start = time.perf_counter()
        completions = engine.chat(chats, Sampling(temperature=0.7, top_p=0.95, max_tokens=256))
        seconds = time.perf_counter() - start
        encoded = engine.tokenizer([c.text for c in completions], add_special_tokens=False)["input_ids"]
        tokens = sum(map(len, encoded))
        generate = f"{tokens / seconds:.0f} tokens/s ({len(completions)} completions, {tokens} tokens)"
        judge = [[{"role": "user", "content": f"Rate this answer from 1 to 5.\nQ: {q}\nA: {c.text}\nScore:"}]
                 for q, c in zip(questions(), completions)]
        start = time.perf_counter()
        scores = engine.score(judge)
        seconds = time.perf_counter() - start
        if sum(s is not None for s in scores) < len(scores) // 2:
            raise RuntimeError(f"only {sum(s is not None for s in scores)} of {len(scores)} prompts scored")
        return generate, f"{len(scores) / seconds:.1f} prompts/s ({len(scores)} judged)"
    finally:
        engine.close()


def check_train(model_dir: Path, scratch: Path, zero: int) -> str:
    import torch

    run_uri = (scratch / f"run-zero{zero}").as_uri()
    rows = [{"instruction": f"Repeat the word {w} {n} times.", "input": "", "output": " ".join([w] * n)}
            for w in WORDS for n in range(1, 33)]
    storage.write_jsonl(f"{run_uri}/round-0/assess/kept.jsonl", rows)
    spec_path = scratch / f"spec-zero{zero}.json"
    spec_path.write_text(json.dumps(spec_dict(model_dir, zero)))
    ranks = min(torch.cuda.device_count(), 2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    result = scratch / f"result-zero{zero}.json"
    command = [*launcher, "-m", "selfalign.stages", "train", "--spec", str(spec_path), "--round", "0",
               "--run-uri", run_uri, "--model", model_dir.as_uri(), "--scratch", str(scratch / f"zero{zero}")]
    proc = subprocess.run(command, env={**os.environ, "SELFALIGN_RESULT_PATH": str(result)},
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    summary = json.loads(result.read_text())
    return (f"{summary['tokensPerSecond']:.0f} tokens/s, {ranks} rank(s), {summary['steps']} steps, "
            f"loss {summary['lossFirst']:.3f} -> {summary['lossLast']:.3f}")


def check_merge(model_dir: Path, scratch: Path) -> str:
    from selfalign.stages import merge
    from selfalign.stages.runtime.context import StageContext

    ctx = StageContext(stage="merge", spec=spec(model_dir, 2), round=0,
                       run_uri=(scratch / "run-zero2").as_uri(), model=model_dir.as_uri(),
                       scratch=str(scratch / "merge"))
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    start = time.perf_counter()
    metrics = merge.run(ctx).metrics
    seconds = time.perf_counter() - start
    return (f"{weights / seconds / 1e6:.0f} MB/s of weights ({seconds:.1f} s with the check), "
            f"max |logit diff| {metrics['maxAbsLogitDiff']:.1e}, "
            f"{metrics['effectKept']:.0%} of the adapter's effect kept")


def check_faiss() -> str:
    import faiss
    import numpy as np

    from selfalign.stages.vectors import knn

    if faiss.get_num_gpus() < 1:
        raise RuntimeError("faiss sees no GPU: is faiss-cpu installed instead of faiss-gpu?")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200_000, 384), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[:10_000] + 0.01 * rng.standard_normal((10_000, 384), dtype=np.float32)
    start = time.perf_counter()
    found = knn.nearest(base, queries, k=10, exact_limit=len(base))
    seconds = time.perf_counter() - start
    if found.search.get("device") != "gpu" or not (found.ids[:, 0] == np.arange(10_000)).mean() > 0.99:
        raise RuntimeError(f"search {found.search}: nearest neighbour is not the perturbed vector")
    return f"{len(queries) / seconds:.0f} queries/s (exact, 200,000 x 384, k=10)"


def run_check(name: str, work: Callable[[], str | tuple[str, ...]], failed: list[str]) -> None:
    import torch

    with PeakMemory() as memory:
        try:
            outcome = work()
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, the others still run
            traceback.print_exc()
            failed.append(name)
            line(name, f"FAILED {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}")
            return
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    for label, rate in zip(name.split("+"), (outcome,) if isinstance(outcome, str) else outcome):
        line(label, f"ok {rate}; peak GPU memory {memory.peak / 2**30:.2f} GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and validate their specs")
    args = parser.parse_args(argv)
    import torch

    if args.dry_run:
        for zero in (2, 3):
            spec(Path("/unused/model"), zero)
        line("gpu_check", f"dry run: would run {', '.join(CHECKS)} on builtin://{MODEL}")
        return 0
    if not torch.cuda.is_available():
        line("gpu_check", "no GPU: torch.cuda.is_available() is False; nothing was checked")
        return EXIT_NO_GPU
    header("gpu_check", ["torch", "vllm", "transformers", "peft", "deepspeed", "faiss-gpu-cu12"])
    line("gpus", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    from selfalign.stages.runtime import builtin

    model_dir = builtin.materialize(MODEL, scratch)
    failed: list[str] = []
    run_check("vllm-generate+vllm-score", lambda: check_vllm(model_dir), failed)
    run_check("train-zero2", lambda: check_train(model_dir, scratch, 2), failed)
    run_check("train-zero3", lambda: check_train(model_dir, scratch, 3), failed)
    if "train-zero2" in failed:
        failed.append("merge-cuda")
        line("merge-cuda", "FAILED: no adapter (train-zero2 failed)")
    else:
        run_check("merge-cuda", lambda: check_merge(model_dir, scratch), failed)
    run_check("faiss-gpu", check_faiss, failed)
    if failed:
        line("gpu_check", f"FAILED: {', '.join(failed)}")
        return 1
    line("gpu_check", f"all {len(CHECKS)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
