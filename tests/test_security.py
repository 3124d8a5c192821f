"""Security: no code runs from a checkpoint, nothing reaches the network during a run, and names
from configs cannot steer writes out of their folders."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import distill
from distill import hf
from distill.config import load_config
from distill.errors import ConfigError
from distill.sweep import run_names

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


class Payload:
    """A pickle that runs code (creates `target`) when loaded the unsafe way."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_pickle_that_runs_code_is_refused_even_when_pickles_are_allowed(tmp_path, reliability_record):
    ran = tmp_path / "payload_ran"
    (tmp_path / "config.json").write_text('{"model_type": "llama4_text", "vocab_size": 8}')
    torch.save({"model.embed_tokens.weight": Payload(ran)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        hf.from_hf(tmp_path, allow_pickle=True)
    assert not ran.exists(), "loading the checkpoint ran its code"
    reliability_record("security", check="pickle with a code payload, allow_pickle=True",
                       outcome="refused by torch.load(weights_only=True); the payload did not run")


def test_a_run_opens_no_network_connection(tmp_path, monkeypatch, reliability_record):
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test: network access to {address} during a run")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or (_ for _ in ()).throw(
        OSError("test: name lookup during a run")))
    cfg = load_config(TINY, [f"run.dir={tmp_path / 'run'}", "train.steps=4", "teacher.warmup_steps=0"])
    assert distill.run(cfg)["status"] == "completed"
    assert attempts == []
    reliability_record("security", check="network during a run (connect/getaddrinfo guarded)",
                       outcome="a whole run (data, steps, evaluation, checkpoints, TensorBoard) made no attempt")


@pytest.mark.parametrize("override", ["run.name=../escape", "run.name=/etc", "run.name=.hidden",
                                      "students.0.name=../x", "students.0.name=a/b"])
def test_names_from_configs_cannot_leave_their_folder(override, reliability_record):
    with pytest.raises(ConfigError, match=r"letters, digits and \._\+- only"):
        load_config(TINY, [override])
    reliability_record("security", check=f"path in a name: `{override}`", outcome="refused at config load")


def test_sweep_run_names_are_single_safe_path_components():
    names = run_names([{"run.name": "../../x", "loss.temperature": 1.0}, {"run.name": "/etc/passwd",
                                                                         "loss.temperature": 2.0}],
                      ["run.name", "loss.temperature"])
    for name in names:
        assert "/" not in name and name not in (".", "..") and not name.startswith(".")
