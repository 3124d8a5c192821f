"""Bytes of parameters and optimizer state per device, per model, for several meshes.

    distill bench memory [--config experiments/quickstart.yaml] [--devices 8]
                         [--mesh data=8 --mesh data=2,fsdp=2,expert=2 ...] [overrides ...]

Nothing is computed on a device: the state is abstract (shapes, dtypes) and each array's share is
its sharding's shard shape. Simulated CPU devices stand in for accelerators (--devices sets
XLA_FLAGS before jax loads), so the table for a slice can be read on a laptop. Prints, per mesh,
the per-device bytes of each model's parameters and optimizer state, the largest over devices.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MESHES = ["data=-1", "fsdp=-1", "data=2,fsdp=2,expert=2", "data=2,fsdp=2,tensor=2"]


def parse_mesh(text: str) -> dict:
    sizes = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        sizes[axis.strip()] = int(size)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (ignored on accelerators)")
    parser.add_argument("--mesh", action="append", help="axis=size,... (repeatable); default: four meshes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if flag not in os.environ.get("XLA_FLAGS", ""):  # jax reads the flag once, at import: start afresh
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
        os.execve(sys.executable, [sys.executable, "-m", "distill.cli", "bench", "memory", *sys.argv[1:]], env)
    import dataclasses

    import jax

    from distill.config import MeshConfig, load_config
    from distill.errors import ConfigError
    from distill.experiment import resolve
    from distill.parallel import state_memory
    from distill.setup import placement

    base = load_config(args.config, args.overrides)
    print(f"{base.run.name}: {jax.device_count()} {jax.devices()[0].platform} devices; MiB per device "
          "(largest device), parameters + optimizer state\n")
    print("| mesh | model | params MiB | optimizer MiB | total MiB | total / unsharded |")
    print("|---|---|---|---|---|---|")
    for text in args.mesh or DEFAULT_MESHES:
        cfg = dataclasses.replace(base, mesh=MeshConfig(**{"data": 1, **parse_mesh(text)}))
        try:
            placed = placement(resolve(cfg))
        except ConfigError as error:
            print(f"| {text} | cannot shard: {error} | | | | |")
            continue
        for name, row in state_memory(placed.abstract_state(), [s.name for s in cfg.students]).items():
            mib = lambda b: b / 2**20  # noqa: E731
            print(f"| {text} | {name} | {mib(row['params']):.2f} | {mib(row['optimizer']):.2f} | "
                  f"{mib(row['params'] + row['optimizer']):.2f} | {row['fraction']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
