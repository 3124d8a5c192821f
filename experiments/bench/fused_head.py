"""Peak memory and time of the student's loss from hidden states, fused LM head vs full logits.

    distill bench fused_head                                   # the docs/performance.md table (CPU)
    distill bench fused_head --vocabs 32000 --hiddens 1024 --tokens 2048 --repeats 1   # a quick look
    distill bench fused_head --fits                            # largest vocab x tokens in --budget-gib
    distill bench fused_head --platform gpu                    # on a GPU: peak device memory
    distill bench fused_head --no-run                          # XLA's compiled estimates only

What it measures, per (vocabulary, hidden size) and path, for value-and-gradient with respect to the
student's final hidden states and head weight of the token mean of `losses.distillation_loss`
(CE + forward KL, a = 0.5, the teacher's statistics; the quickstart's loss), with a teacher of the
same hidden size, all in bf16:
  - unfused: today's path before the fused head: logits = hidden @ W (float32, as the model makes
    them) for student and teacher, then the chunked loss;
  - fused:   `losses.Head(hidden, W)` for both: each chunk's logits are formed inside the loss loop
    and recomputed in the backward pass.
Columns: XLA's compiled temporary buffers and its whole estimate (arguments + outputs +
temporaries, from `memory_analysis()`, nothing allocated), the process's peak resident memory while
the step runs (Linux VmHWM, reset after the inputs exist; with --platform gpu the device
allocator's peak_bytes_in_use instead) and the median wall time after a warm-up call. A
configuration whose estimate would not fit in the free memory (less 4 GiB) is compiled but not run.
Each configuration runs in its own process, one at a time, so the peaks do not mix.

--fits compiles (never runs) both paths at growing sizes and reports the largest vocabulary at
--tokens, and the largest token count at each vocabulary, whose compiled estimate fits --budget-gib.
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


def _abstract_inputs(tokens: int, vocab: int, hidden: int):
    import jax
    import jax.numpy as jnp

    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    return (bf16(tokens, hidden), bf16(hidden, vocab), bf16(tokens, hidden), bf16(hidden, vocab),
            jax.ShapeDtypeStruct((tokens,), jnp.int32))


def _inputs(tokens: int, vocab: int, hidden: int, seed: int):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 5)
    make = jax.jit(lambda k, shape, scale: (scale * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16),
                   static_argnums=(1, 2))
    scale = 1.0 / hidden**0.5 * 3
    return (make(keys[0], (tokens, hidden), 1.0), make(keys[1], (hidden, vocab), scale),
            make(keys[2], (tokens, hidden), 1.0), make(keys[3], (hidden, vocab), scale),
            jax.random.randint(keys[4], (tokens,), 0, vocab))


def _step(mode: str, chunk_size):
    import jax

    import losses

    config = losses.WeightingConfig(alpha=0.5)

    def loss(h, w, ht, wt, labels):
        student, teacher = losses.Head(h, w), losses.Head(ht, wt)
        if mode == "unfused":
            student, teacher = student.logits(), teacher.logits()
        per_token, _ = losses.distillation_loss(student, teacher, labels, step=0, weighting=config,
                                                chunk_size=chunk_size)
        return losses.token_mean(per_token)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _estimate(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp_gib": m.temp_size_in_bytes / GIB,
            "estimate_gib": (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / GIB,
            "run_extra_gib": (m.temp_size_in_bytes + m.output_size_in_bytes) / GIB}


def child(tokens: int, vocab: int, hidden: int, mode: str, repeats: int, chunk_size, run: bool = True) -> dict:
    import gc

    import jax
    import psutil

    compiled = _step(mode, chunk_size).lower(*_abstract_inputs(tokens, vocab, hidden)).compile()
    result = {"vocab": vocab, "hidden": hidden, "mode": mode, "tokens": tokens, **_estimate(compiled)}
    on_cpu = jax.default_backend() == "cpu"
    if not run:
        result["skipped"] = "compiled only (--no-run)"
        return result
    if on_cpu and (result["estimate_gib"] + 4) * GIB > psutil.virtual_memory().available:
        result["skipped"] = (f"needs ~{result['estimate_gib']:.1f} GiB + 4, "
                             f"{psutil.virtual_memory().available / GIB:.1f} GiB free")
        return result
    args = _inputs(tokens, vocab, hidden, seed=vocab + hidden)
    jax.block_until_ready(args)
    gc.collect()
    if on_cpu:
        with open("/proc/self/clear_refs", "w") as refs:  # reset the peak (VmHWM) to the current RSS
            refs.write("5")
    else:
        jax.devices()[0].memory_stats()  # the allocator's peak is over the process: read after the run
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    if on_cpu:
        result["peak_gib"] = _vm("VmHWM") / GIB
    else:
        result["peak_gib"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / GIB
    result["seconds"] = statistics.median(times[1:] or times)  # --repeats 0: the one call
    return result


def fits(tokens: int, hiddens: list[int], vocabs: list[int], budget_gib: float, chunk_size) -> list[str]:
    """The largest vocabulary at `tokens` and the largest token count at each vocabulary whose compiled
    estimate fits the budget; bisection over compiled programs (nothing is allocated)."""
    def estimate(mode, t, v, h):
        compiled = _step(mode, chunk_size).lower(*_abstract_inputs(t, v, h)).compile()
        return _estimate(compiled)["estimate_gib"]

    def largest(fn, low, high):  # the largest n in [low, high] with fn(n) <= budget (fn increasing)
        if fn(low) > budget_gib:
            return None
        while high - low > max(1, low // 32):  # to about 3 %
            mid = (low + high) // 2
            low, high = (mid, high) if fn(mid) <= budget_gib else (low, mid)
        return low

    rows = []
    for hidden in hiddens:
        for mode in ("unfused", "fused"):
            v = largest(lambda v, mode=mode, hidden=hidden: estimate(mode, tokens, v, hidden), 1024, 4_194_304)
            cells = [f"{v:,}" if v else "none"]
            for vocab in vocabs:
                t = largest(lambda t, mode=mode, vocab=vocab, hidden=hidden: estimate(mode, t, vocab, hidden),
                            128, 1_048_576)
                cells.append(f"{t:,}" if t else "none")
            rows.append(f"| {hidden} | {mode} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def _row(r: dict, time_ratio: str) -> str:
    head = f"| {r['vocab']:,} | {r['hidden']} | {r['mode']} | {r['temp_gib']:.2f} | {r['estimate_gib']:.2f} | "
    if "skipped" in r:
        return head + f"not run: {r['skipped']} | | | |"
    return head + f"{r['peak_gib']:.2f} | {r['seconds']:.2f} | {time_ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256, 202048])
    parser.add_argument("--hiddens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--modes", nargs="+", default=["unfused", "fused"], choices=["unfused", "fused"])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after a warm-up one (0: one call)")
    parser.add_argument("--chunk-size", default="auto", help="tokens per chunk (default: auto)")
    parser.add_argument("--platform", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: peak device memory from the allocator (memory_stats) instead of RSS")
    parser.add_argument("--no-run", action="store_true", help="compile only: XLA's estimates, no peak or time")
    parser.add_argument("--fits", action="store_true", help="largest sizes within --budget-gib (compiled only)")
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--child", nargs=3, metavar=("VOCAB", "HIDDEN", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", args.platform if args.platform == "cpu" else "cuda")
    chunk_size = args.chunk_size if args.chunk_size == "auto" else int(args.chunk_size)
    if args.child:
        vocab, hidden, mode = int(args.child[0]), int(args.child[1]), args.child[2]
        print(json.dumps(child(args.tokens, vocab, hidden, mode, args.repeats, chunk_size, not args.no_run)))
        return

    import psutil

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.0f} GiB; "
          f"platform {args.platform}; {args.tokens} tokens, bf16 hidden states and heads; value and gradient "
          f"(hidden, head weight) of the token-mean distillation_loss (CE + forward KL, a = 0.5); "
          f"chunk_size {args.chunk_size}\n")
    if args.fits:
        print(f"| hidden | path | largest vocab at {args.tokens:,} tokens | "
              + " | ".join(f"largest tokens at vocab {v:,}" for v in args.vocabs) + " |")
        print("|---:|---|---:|" + "---:|" * len(args.vocabs))
        fits(args.tokens, args.hiddens, args.vocabs, args.budget_gib, chunk_size)
        return
    peak = "peak device memory (GiB)" if args.platform == "gpu" else "peak RSS (GiB)"
    print(f"| vocab | hidden | path | XLA temp (GiB) | XLA estimate (GiB) | {peak} | time (s) | time / unfused |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for hidden in args.hiddens:
        for vocab in args.vocabs:
            results = {}
            for mode in args.modes:
                done = subprocess.run(
                    [sys.executable, __file__, "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                     "--chunk-size", args.chunk_size, "--platform", args.platform,
                     *(["--no-run"] if args.no_run else []),
                     "--child", str(vocab), str(hidden), mode],
                    check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo_pythonpath()},
                )
                if done.returncode != 0:
                    print(f"| {vocab:,} | {hidden} | {mode} | failed (exit {done.returncode}): "
                          f"{done.stderr.strip().splitlines()[-1:]} | | | | |", flush=True)
                    continue
                r = results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                base = results.get("unfused", {})
                ratio = (f"{r['seconds'] / base['seconds']:.2f}" if "seconds" in r and "seconds" in base else "")
                print(_row(r, ratio), flush=True)


if __name__ == "__main__":
    sys.path[0] = REPO_ROOT
    main()
