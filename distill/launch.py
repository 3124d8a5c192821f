"""`distill launch`: start one multi-process JAX job on this machine, to try a multi-host config on a
laptop before booking a cluster.

    distill launch --processes 2 --devices-per-process 4 -- distill run CONFIG mesh.data=2 mesh.fsdp=4

starts the command N times with JAX's coordinator variables (`JAX_COORDINATOR_ADDRESS` and
`JAX_COORDINATOR_BIND_ADDRESS` on 127.0.0.1, so the coordinator listens there only,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), which `distill run` passes to
`jax.distributed.initialize` (`distill.parallel.initialize_distributed`): the processes form one
job over JAX's own runtime (gloo between CPU devices), nothing home-made. `--devices-per-process`
gives each process that many simulated CPU devices. Process 0 prints to this terminal; the others
write `process-<i>.log` in `--log-dir`. When one process fails, the others get `grace` seconds to
end, then are stopped; the exit code is the first failure's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distill.localhost import HOST, free_port


def process_env(index: int, processes: int, port: int, devices: int | None, base=os.environ) -> dict[str, str]:
    """The environment of process `index` of the job."""
    env = {**base, "JAX_COORDINATOR_ADDRESS": f"{HOST}:{port}", "JAX_COORDINATOR_BIND_ADDRESS": f"{HOST}:{port}",
           "JAX_NUM_PROCESSES": str(processes),
           "JAX_PROCESS_ID": str(index), "PYTHONUNBUFFERED": "1"}
    if devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


def command_line(command: list[str]) -> list[str]:
    """`distill ...` runs through this interpreter (`python -m distill.cli ...`), whatever PATH holds."""
    return [sys.executable, "-m", "distill.cli", *command[1:]] if command and command[0] == "distill" else command


def launch(command: list[str], processes: int, devices: int | None, log_dir: Path, grace: float = 60.0) -> int:
    """Run `command` as one job of `processes` local processes; returns its exit code."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port, argv, children, logs = free_port(), command_line(command), [], []
    try:
        for index in range(processes):
            log = None if index == 0 else open(log_dir / f"process-{index}.log", "w")  # noqa: SIM115
            logs.append(log)
            children.append(subprocess.Popen(argv, env=process_env(index, processes, port, devices), stdout=log,
                                             stderr=subprocess.STDOUT if log else None, stdin=subprocess.DEVNULL))
        return _wait(children, grace)
    except KeyboardInterrupt:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)  # each checkpoints the step it is at and stops
        return _wait(children, grace) or 130
    finally:
        for log in logs:
            if log:
                log.close()


def _described(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"


def _wait(children: list[subprocess.Popen], grace: float) -> int:
    """Wait for every process; after the first failure the rest get `grace` seconds, then SIGTERM
    (and SIGKILL 30 s later). Returns 0 or the first failure's exit code (128 + N for signal N)."""
    failed, failed_at = None, None
    while any(child.poll() is None for child in children):
        for index, child in enumerate(children):
            if failed is None and child.returncode not in (None, 0):
                failed, failed_at = child.returncode, time.time()
                print(f"distill launch: process {index} {_described(child.returncode)}; the others get {grace:.0f} s "
                      "to stop", file=sys.stderr)
        if failed_at is not None and time.time() - failed_at > grace:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            deadline = time.time() + 30
            while any(c.poll() is None for c in children) and time.time() < deadline:
                time.sleep(0.2)
            for child in children:
                if child.poll() is None:
                    child.kill()
            break
        time.sleep(0.2)
    codes = [child.wait() for child in children]
    failed = failed if failed is not None else next((code for code in codes if code), 0)
    if failed:
        print("distill launch: " + "; ".join(f"process {i} {_described(c)}" for i, c in enumerate(codes)),
              file=sys.stderr)
    return 128 - failed if failed < 0 else failed
