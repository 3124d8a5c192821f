"""Peak memory and time of the KD loss, chunked vs naive, for vocabularies of 32k, 128k and 202k.

    python experiments/bench/losses.py                      # 8192 tokens, bf16 logits
    python experiments/bench/losses.py --tokens 2048 --vocabs 32000 --repeats 1   # a quick look

What it measures, per vocabulary and implementation, for value-and-gradient (with respect to the
student logits) of the token mean of a per-token loss:
  - naive:   losses.forward_kl(..., chunk_size=None), all tokens at once (plain autodiff);
  - chunked: losses.forward_kl(...) with the default chunk size (custom VJP, per-chunk remat);
  - step:    losses.distillation_loss(...) chunked: CE + forward KL + teacher statistics + a.
Columns: XLA's compiled temporary buffers (`memory_analysis()`, without inputs and outputs), the
process's peak resident memory while the loss runs (Linux VmHWM, reset after the inputs exist)
and the median wall time of a call after a warm-up call. A configuration whose compiled buffers
would not fit in the free memory is compiled but not run. Each configuration runs in its own
process so the peaks do not mix. docs/losses.md ("Memory and speed") has the table of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from _rss import GIB, REPO_ROOT, repo_pythonpath
from _rss import process_memory as _vm


def _inputs(tokens: int, vocab: int, seed: int):
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(2):
        host = np.empty((tokens, vocab), ml_dtypes.bfloat16)
        for start in range(0, tokens, 256):  # in slices, so generating never needs a float32 copy
            host[start:start + 256] = (3 * rng.standard_normal((min(256, tokens - start), vocab), np.float32))
        arrays.append(jax.device_put(host))
        del host
    labels = jnp.asarray(rng.integers(0, vocab, tokens))
    return arrays[0], arrays[1], labels


def _loss_fn(mode: str, labels):
    import losses

    if mode == "step":
        config = losses.WeightingConfig(alpha=0.5, difficulty="teacher_label_prob")

        def loss(student, teacher):
            per_token, _ = losses.distillation_loss(student, teacher, labels, step=0, weighting=config,
                                                    temperature=2.0)
            return losses.token_mean(per_token)
    else:
        chunk_size = None if mode == "naive" else losses.DEFAULT_CHUNK_SIZE

        def loss(student, teacher):
            return losses.token_mean(losses.forward_kl(student, teacher, temperature=2.0, chunk_size=chunk_size))
    return loss


def child(tokens: int, vocab: int, mode: str, repeats: int) -> dict:
    import gc

    import jax
    import psutil

    student, teacher, labels = _inputs(tokens, vocab, seed=vocab)
    step = jax.jit(jax.value_and_grad(_loss_fn(mode, labels)))
    compiled = step.lower(student, teacher).compile()
    memory = compiled.memory_analysis()
    result = {"vocab": vocab, "mode": mode, "tokens": tokens, "temp_gib": memory.temp_size_in_bytes / GIB,
              "inputs_gib": memory.argument_size_in_bytes / GIB}
    need = memory.temp_size_in_bytes + memory.output_size_in_bytes
    if need > 0.75 * psutil.virtual_memory().available:  # leave room: the machine is shared
        result["skipped"] = f"needs {need / GIB:.1f} GiB more, {psutil.virtual_memory().available / GIB:.1f} free"
        return result
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:  # reset the peak (VmHWM) to the current RSS
        refs.write("5")
    before = _vm("VmRSS")
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(student, teacher))
        times.append(time.perf_counter() - start)
    result.update(peak_gib=_vm("VmHWM") / GIB, above_inputs_gib=(_vm("VmHWM") - before) / GIB,
                  seconds=statistics.median(times[1:]))
    return result


def _row(r: dict) -> str:
    if "skipped" in r:
        return (f"| {r['vocab']:,} | {r['mode']} | {r['temp_gib']:.2f} | not run: {r['skipped']} | | |")
    return (f"| {r['vocab']:,} | {r['mode']} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} | "
            f"{r['above_inputs_gib']:.2f} | {r['seconds']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256, 202048])
    parser.add_argument("--modes", nargs="+", default=["naive", "chunked", "step"], choices=["naive", "chunked", "step"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("VOCAB", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.tokens, int(args.child[0]), args.child[1], args.repeats)))
        return

    import psutil

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.0f} GiB; "
          f"{args.tokens} tokens, bf16 logits, value and gradient of the token-mean loss (T = 2)\n")
    print("| vocab | loss | XLA temp buffers (GiB) | peak RSS (GiB) | RSS above inputs (GiB) | time (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for vocab in args.vocabs:
        for mode in args.modes:
            done = subprocess.run(
                [sys.executable, __file__, "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                 "--child", str(vocab), mode],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo_pythonpath()},
            )
            if done.returncode != 0:
                print(f"| {vocab:,} | {mode} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} | | | |")
                continue
            print(_row(json.loads(done.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    # This script is named like the package it measures: `import losses` must find the package.
    sys.path[0] = REPO_ROOT
    main()
