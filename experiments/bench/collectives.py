"""The collectives in the compiled co-distillation step, per mesh (what docs/sharding.md lists).

    distill bench collectives [--config tests/configs/sharded.yaml] [--devices 8]
                              [--mesh data=2,fsdp=2,expert=2 ...] [overrides ...]

The step is lowered and compiled from shapes alone on simulated CPU devices (--devices sets
XLA_FLAGS before jax loads). Prints, per mesh, each collective with its result shape and count,
and whether any all-gather produces a whole routed-expert weight (expert parallelism must not).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

DEFAULT_MESHES = ["data=8", "fsdp=8", "data=2,fsdp=2,expert=2", "data=2,fsdp=2,tensor=2", "data=2,expert=4"]


def array_shapes(shape: str) -> list[str]:
    """The array shapes in an HLO result shape (one, or the members of a tuple)."""
    return re.findall(r"[a-z0-9]+\[[0-9,]*\]", shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tests/configs/sharded.yaml")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--mesh", action="append", help="axis=size,... (repeatable)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if flag not in os.environ.get("XLA_FLAGS", ""):  # jax reads the flag once, at import: start afresh
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
        os.execve(sys.executable, [sys.executable, "-m", "distill.cli", "bench", "collectives", *sys.argv[1:]], env)

    from distill.config import load_config
    from distill.experiment import resolve
    from distill.parallel import all_expert_gathers, collectives
    from distill.setup import compiled_step

    for text in args.mesh or DEFAULT_MESHES:
        sizes = [f"mesh.{axis}=1" for axis in ("data", "fsdp", "tensor", "expert")]
        sizes += [f"mesh.{part.strip()}" for part in text.split(",")]
        cfg = load_config(args.config, [*args.overrides, *sizes])
        found = collectives(compiled_step(cfg).as_text())
        models = [model for _, model in resolve(cfg).models()]
        whole = all_expert_gathers(found, models, cfg.mesh.fsdp, cfg.mesh.tensor)
        print(f"\n{text}: {sum(found.values())} collectives; all-gathers holding every expert's weights: "
              f"{', '.join(whole) if whole else 'none'}")
        print("| collective | result shape | count |\n|---|---|---|")
        for (op, shape), count in sorted(found.items()):
            arrays = array_shapes(shape)
            shown = shape if len(arrays) == 1 else f"tuple of {len(arrays)}: {', '.join(arrays[:3])}{', ...' * (len(arrays) > 3)}"
            print(f"| {op} | {shown} | {count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
