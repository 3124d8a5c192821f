"""The fused LM head on 8 simulated devices (a subprocess): hidden states split over the tokens, the
head weight over the vocabulary, and the value and gradients of a distillation loss equal the
1-device ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import losses
assert jax.device_count() == 8
rng = np.random.default_rng(0)
h, ht = (rng.normal(size=(4, 16, 8)).astype(np.float32) for _ in range(2))
w, wt = (0.5 * rng.normal(size=(8, 64)).astype(np.float32) for _ in range(2))
labels = rng.integers(0, 60, (4, 16))
config = losses.WeightingConfig(difficulty="teacher_label_prob")

def loss(h, w, ht, wt):
    per_token, stats = losses.distillation_loss(losses.Head(h, w), losses.Head(ht, wt), labels, step=1,
                                                weighting=config, kd="reverse_kl", vocab_size=60, chunk_size=12)
    return losses.token_mean(per_token), stats["teacher_accuracy"]

step = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
(value, accuracy), grads = step(h, w, ht, wt)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
rows, columns = NamedSharding(mesh, P("data", None, None)), NamedSharding(mesh, P(None, "tensor"))
args = [jax.device_put(x, s) for x, s in ((h, rows), (w, columns), (ht, rows), (wt, columns))]
(sharded_value, sharded_accuracy), sharded_grads = step(*args)
assert len(args[1].sharding.device_set) == 8
np.testing.assert_allclose(sharded_value, value, rtol=1e-5)
np.testing.assert_allclose(sharded_accuracy, accuracy)
for got, expected in zip(sharded_grads, grads):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
print("ok")
"""


def test_fused_head_on_8_devices_equals_one_device():
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CHECK], check=False, capture_output=True, text=True, env=env,
                            timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
