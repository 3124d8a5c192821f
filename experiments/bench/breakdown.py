"""Where the co-distillation step's time goes: a `jax.profiler` trace of a few compiled steps, with
every XLA op's exclusive time attributed to the source line that emitted it.

    python experiments/bench/breakdown.py                       # the quickstart's step, 3 traced steps
    python experiments/bench/breakdown.py CONFIG.yaml key=value ... --steps 5 --top 40
    python experiments/bench/breakdown.py --trace-dir /tmp/trace  # keep the trace (TensorBoard's profile
                                                                # plugin or Perfetto can open it)

How: the step is compiled as `distill run` compiles it (`distill.setup.compiled_step`), run twice
to warm up, then traced. Each op event on XLA's threads gets its time minus the time of the events
nested inside it (a while loop's body ops are its children), so the exclusive times add up to the
busy time of the step. The compiled HLO names each op's Python stack (its `StackFrames` table);
the innermost frame inside this repository gives the op's source line and its part of the model
(attention, MoE, norms, losses, optimizer, ...). "Backward" is an op whose name JAX marks as a
transpose (the VJP). Ops without a stack (copies XLA inserts, loop plumbing) are listed as such.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository before this folder: losses.py here is not `losses`

import jax  # noqa: E402
from _common import table  # noqa: E402

import distill  # noqa: E402
from distill.setup import compiled_step, initial_state, random_batch  # noqa: E402

# Innermost repository file (and function) -> the part of the step it belongs to.
PARTS = [
    ("distill/model/attention.py", ("grouped_attention", "_attend"), "attention: logits, softmax, values"),
    ("distill/model/attention.py", None, "attention: projections, QK norm, temperature"),
    ("distill/model/rope.py", None, "attention: RoPE"),
    ("distill/model/dispatch.py", ("_tiled_ffn_fwd", "_tiled_ffn_bwd", "tiled_expert_ffn"), "MoE: routed experts"),
    ("distill/model/dispatch.py", None, "MoE: router, sort, combine"),
    ("distill/model/moe.py", None, "MoE: router, sort, combine"),
    ("distill/model/expert_parallel.py", None, "MoE: expert parallel exchange"),
    ("losses/_moe.py", None, "MoE: router losses"),
    ("distill/model/layers.py", ("swiglu",), "SwiGLU: shared expert, dense MLP"),
    ("distill/model/layers.py", None, "RMSNorm"),
    ("distill/model/transformer.py", None, "embedding, LM head, residuals"),
    ("losses/", None, "losses: CE, KD, a"),
    ("distill/optim.py", None, "optimizer update"),
    ("distill/step/", None, "step: metrics, accumulation"),
]


def parse_stacks(hlo_text: str) -> dict[str, tuple[str, list[tuple[str, str, int]]]]:
    """Op name -> (JAX op_name, stack innermost first as (file, function, line)) from HLO text."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and line.strip():
            index, _, rest = line.partition(" ")
            if index.isdigit():
                current[int(index)] = rest
            else:
                current = None
        else:
            current = None
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    fields = lambda text: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}  # noqa: E731
    locations = {k: (files[f["file_name_id"]], functions[f["function_name_id"]], f["line"])
                 for k, f in ((k, fields(v)) for k, v in tables.get("FileLocations", {}).items())}
    frames = {k: (f["file_location_id"], f["parent_frame_id"])
              for k, f in ((k, fields(v)) for k, v in tables.get("StackFrames", {}).items())}

    def stack(frame: int) -> list[tuple[str, str, int]]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, parent = frames[frame]
            out.append(locations[location])
            frame = parent
        return out

    ops = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?(\S+) = .*?metadata=\{(.*?)\}", line)
        if match:
            op_name = re.search(r'op_name="([^"]*)"', match.group(2))
            frame = re.search(r"stack_frame_id=(\d+)", match.group(2))
            ops[match.group(1)] = (op_name.group(1) if op_name else "", stack(int(frame.group(1))) if frame else [])
    return ops


def exclusive_times(trace_dir: Path) -> tuple[collections.Counter, collections.Counter]:
    """(op event name -> exclusive ns, -> count) over the XLA threads of the newest trace."""
    path = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)[-1]
    data = jax.profiler.ProfileData.from_file(str(path))
    times, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            open_events: list[tuple[str, int]] = []  # (name, end) of the events enclosing this one
            for event in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
                while open_events and open_events[-1][1] <= event.start_ns:
                    open_events.pop()
                if open_events:
                    times[open_events[-1][0]] -= event.duration_ns
                times[event.name] += event.duration_ns
                counts[event.name] += 1
                open_events.append((event.name, event.start_ns + event.duration_ns))
    for name in [n for n in times if "wait for completion" in n]:  # the host waiting, not work
        del times[name]
    return times, counts


def source_of(stack: list[tuple[str, str, int]]) -> tuple[str, str, int] | None:
    root = str(ROOT) + "/"
    inside = [(f[len(root):], fn, line) for f, fn, line in stack if f.startswith(root)]
    return next(((f, fn, line) for f, fn, line in inside if not f.startswith("experiments/")), None)


def part_of(source: tuple[str, str, int] | None) -> str:
    if source is None:
        return "no source line (copies, loop plumbing)"
    file, function, _ = source
    for prefix, functions, part in PARTS:
        if file.startswith(prefix) and (functions is None or function.split(".")[0] in functions):
            return part
    return f"other: {file}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=25, help="rows of the source-line and op tables")
    parser.add_argument("--trace-dir", type=Path, help="keep the trace here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if "=" in args.config:  # only overrides were given: they apply to the quickstart
        args.overrides, args.config = [args.config, *args.overrides], parser.get_default("config")
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    cfg = distill.load_config(args.config, args.overrides)
    # An executable from the persistent compilation cache carries the stack frames of whichever
    # checkout compiled it first (the cache key leaves source paths out): compile afresh.
    jax.config.update("jax_enable_compilation_cache", False)
    start = time.perf_counter()
    step = compiled_step(cfg)
    print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
    ops = parse_stacks(step.as_text())
    state, batch = initial_state(cfg), random_batch(cfg)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = args.trace_dir or Path(scratch)
        start = time.perf_counter()
        with jax.profiler.trace(str(trace_dir)):
            for _ in range(args.steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / args.steps
        times, counts = exclusive_times(trace_dir)

    per_step = lambda ns: ns / 1e6 / args.steps  # noqa: E731
    busy = per_step(sum(times.values()))
    parts, lines, phases = collections.Counter(), collections.Counter(), collections.Counter()
    for name, ns in times.items():
        op_name, stack = ops.get(name, ("", []))
        source = source_of(stack)
        backward = "transpose(" in op_name
        parts[(part_of(source), backward)] += ns
        lines[f"{source[0]}:{source[2]} ({source[1]})" if source else "-"] += ns
        phases[backward] += ns

    print(f"\n### Where the step's time goes ({args.config}; {args.steps} traced steps)\n")
    print(f"Wall time {wall * 1e3:.0f} ms per step (traced, so slower than untraced); XLA ops busy "
          f"{busy:.0f} ms; forward {per_step(phases[False]):.0f} ms, backward {per_step(phases[True]):.0f} ms.\n")
    totals = collections.Counter()
    for (part, _), ns in parts.items():
        totals[part] += ns
    rows = [[part, f"{per_step(ns):.1f}", f"{per_step(parts[(part, False)]):.1f}", f"{per_step(parts[(part, True)]):.1f}",
             f"{100 * per_step(ns) / busy:.1f}%"] for part, ns in totals.most_common()]
    print(table(["part", "ms", "forward ms", "backward ms", "share"], rows))
    rows = [[line, f"{per_step(ns):.1f}"] for line, ns in lines.most_common(args.top)]
    print("\n" + table(["source line (innermost in this repository)", "ms"], rows))
    rows = [[name, f"{counts[name] / args.steps:.0f}", f"{per_step(ns):.2f}", ops.get(name, ("", []))[0][-80:]]
            for name, ns in times.most_common(args.top)]
    print("\n" + table(["XLA op", "runs per step", "ms", "JAX op name"], rows))


if __name__ == "__main__":
    main()
