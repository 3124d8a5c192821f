"""Bad input through the `distill` command: one clear message that names the field (or file) and the
fix, a non-zero exit, and nothing written or overwritten (the whole working folder is compared byte
for byte before and after).

Each case also leaves a record (input, exit code, message) for docs/reliability.md
(`python experiments/reliability/report.py`)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Llama4ForCausalLM, Llama4TextConfig

from distill import cli
from distill.config import load_config, save_config

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


@dataclass(frozen=True)
class Case:
    input: str  # what the user gave, for the report
    argv: Callable[[Path], list[str]]  # the command's arguments, given the working folder
    expected: tuple[str, ...]  # fragments the message must hold: the field and the fix
    setup: Callable[[Path], None] = lambda work: None


def run_cmd(*words: str) -> Callable[[Path], list[str]]:
    return lambda work: ["run", str(TINY), f"run.dir={work / 'run'}", *[w.format(work=work) for w in words]]


def hf_model_dir(work: Path) -> Path:
    torch.manual_seed(0)
    config = Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_local_experts=2, interleave_moe_layer_step=1, attention_chunk_size=8)
    path = work / "hf"
    Llama4ForCausalLM(config).save_pretrained(path)
    return path


def hf_missing_tensor(work: Path) -> None:
    path = hf_model_dir(work)
    [weights] = path.glob("*.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.feed_forward.router.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})


def hf_other_architecture(work: Path) -> None:
    path = hf_model_dir(work)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def hf_pickle(work: Path) -> None:
    path = hf_model_dir(work)
    [weights] = path.glob("*.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(weights).items()}, path / "pytorch_model.bin")
    weights.unlink()


def a_run_dir_of_another_config(work: Path) -> None:
    (work / "run").mkdir()
    save_config(load_config(TINY, [f"run.dir={work / 'run'}", "train.steps=20"]), work / "run" / "config.yaml")
    (work / "run" / "metrics.jsonl").write_text('{"step": 2, "teacher/ce": 5.0}\n')


def a_folder_of_other_files(work: Path) -> None:
    (work / "run").mkdir()
    (work / "run" / "notes.txt").write_text("a user's own file")


def text_that_is_not_utf8(work: Path) -> None:
    (work / "corpus").mkdir()
    for i in range(4):
        (work / "corpus" / f"{i}.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    (work / "corpus" / "bad.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8\n" * 50)
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["def f(x): return x + 1"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=200, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(work / "tokenizer.json"))


def a_sweep_on_a_missing_key(work: Path) -> None:
    (work / "sweep.yaml").write_text(yaml.safe_dump({"base": str(TINY), "grid": {"train.stesp": [5, 10]}}))


CASES = {
    "unknown-key": Case("unknown config key `train.stesp=5`", run_cmd("train.stesp=5"),
                        ("train.stesp", "Did you mean 'steps'?")),
    "unknown-section": Case("unknown section `trian.steps=5`", run_cmd("trian.steps=5"),
                            ("trian", "Did you mean 'train'?")),
    "wrong-type": Case("wrong type `train.steps=ten`", run_cmd("train.steps=ten"), ("train.steps", "'ten'")),
    "bad-value": Case("out-of-range value `loss.temperature=-1`", run_cmd("loss.temperature=-1"),
                      ("loss.temperature=-1", "> 0")),
    "mesh-devices": Case("mesh larger than the machine: `mesh.data=4` on 1 device", run_cmd("mesh.data=4"),
                         ("mesh: data=4", "1 are available", "make the product equal the device count")),
    "vocab-differs": Case("student vocabulary differs from the teacher's (`students.0.model.vocab_size=320`)",
                          run_cmd("students.0.model.vocab_size=320"),
                          ("students[0].model.vocab_size=320", "teacher's 256")),
    "vocab-below-tokenizer": Case("model vocabulary smaller than the tokenizer's (all models at 128)",
                                  run_cmd("teacher.model.vocab_size=128", "students.0.model.vocab_size=128",
                                          "students.1.model.vocab_size=128"),
                                  ("vocab_size=128", "256 tokens")),
    "seq-len": Case("`data.seq_len` longer than the model's limit (64 > 32)",
                    run_cmd("data.seq_len=64", "teacher.model.max_position_embeddings=32"),
                    ("data.seq_len=64", "max_position_embeddings (32)")),
    "digits-text-model": Case("image data for text-only models (`data.source=digits` without `model.vision`)",
                              run_cmd("data.source=digits", "data.seq_len=36"),
                              ("teacher.model.vision", "required by data.source=digits", "add a vision section")),
    "data-missing": Case("data path that does not exist", run_cmd("data.source={work}/nowhere"),
                         ("data.source=", "nowhere", "no such file or directory")),
    "data-empty": Case("empty data directory", run_cmd("data.source={work}/empty"), ("data.source=", "no files"),
                       setup=lambda work: (work / "empty").mkdir()),
    "data-unreadable": Case("unreadable data file (a dangling link)", run_cmd("data.source={work}/corpus"),
                            ("data.source=", "cannot read", "link.txt"),
                            setup=lambda work: ((work / "corpus").mkdir(),
                                                (work / "corpus" / "link.txt").symlink_to(work / "gone"))),
    "non-utf8": Case("non-UTF-8 bytes with a Hugging Face tokenizer (the byte tokenizer accepts any bytes)",
                     run_cmd("data.source={work}/corpus", "data.tokenizer={work}/tokenizer.json"),
                     ("data.tokenizer=", "bad.txt: not valid UTF-8", "data.tokenizer=byte"),
                     setup=text_that_is_not_utf8),
    "run-dir-other-config": Case("existing run directory with a different config",
                                 run_cmd(), ("holds a run with a different config", "train.steps", "--resume",
                                             "--force-new"), setup=a_run_dir_of_another_config),
    "run-dir-foreign": Case("existing folder that is not a run directory", run_cmd(),
                            ("not a distill run directory", "--force-new"), setup=a_folder_of_other_files),
    "resume-nothing": Case("`--resume` where there is no run", lambda work: run_cmd()(work) + ["--resume"],
                           ("--resume", "holds no run to resume", "drop --resume")),
    "run-name-traversal": Case("run name escaping runs/ (`run.name=../../etc`)",
                               lambda work: ["run", str(TINY), "run.name=../../etc"],
                               ("run.name='../../etc'", "set run.dir")),
    "hf-missing-tensor": Case("Hugging Face directory with a missing tensor",
                              lambda work: ["import-hf", str(work / "hf"), str(work / "out")],
                              ("model.layers.1.feed_forward.router.weight is missing",), setup=hf_missing_tensor),
    "hf-architecture": Case("Hugging Face directory of another architecture (`model_type: llama`)",
                            lambda work: ["import-hf", str(work / "hf"), str(work / "out")],
                            ("model_type='llama'",), setup=hf_other_architecture),
    "hf-pickle": Case("pickle checkpoint (`pytorch_model.bin`) without permission",
                      lambda work: ["import-hf", str(work / "hf"), str(work / "out")],
                      ("pickle", "--allow-pickle"), setup=hf_pickle),
    "sweep-missing-key": Case("sweep axis on a key that does not exist (`train.stesp`)",
                              lambda work: ["sweep", str(work / "sweep.yaml"), "--dir", str(work / "out")],
                              ("train.stesp", "unknown key", "Did you mean 'steps'?"), setup=a_sweep_on_a_missing_key),
    "cache-missing": Case("`teacher.source=cache` pointing at a folder without a cache",
                          run_cmd("teacher.source=cache", "teacher.path={work}", "teacher.warmup_steps=0"),
                          ("teacher.path=", "no meta.json", "`distill cache`")),
    "cache-untrained-teacher": Case("`distill cache` of a config whose teacher is untrained (source scratch)",
                                    lambda work: ["cache", str(TINY), "--k", "8", "--out", str(work / "cache")],
                                    ("teacher.source='scratch'", "teacher.source to run or hf")),
    "cache-k": Case("`distill cache --k 0`", lambda work: ["cache", str(TINY), "teacher.source=hf",
                                                           f"teacher.path={work / 'hf'}", "--k", "0", "--out",
                                                           str(work / "cache")],
                    ("--k 0", "must be in [1, 256]"), setup=hf_model_dir),
    "on-policy-control": Case("on-policy rows for a control student (`students.1.loss={{on_policy: {{fraction: 0.5}}}}`)",
                              run_cmd("students.1.loss={{on_policy: {{fraction: 0.5}}}}"),
                              ("students[1].loss.on_policy.fraction=0.5", "is a control", "set fraction: 0")),
    "on-policy-prompt": Case("on-policy prompt as long as the rows (`loss.on_policy={{fraction: 0.5, prompt_tokens: 32}}`)",
                             run_cmd("loss.on_policy={{fraction: 0.5, prompt_tokens: 32}}"),
                             ("loss.on_policy.prompt_tokens=32", "shorter than data.seq_len (32)")),
    "run-dir-file": Case("`run.dir` naming an existing regular file", run_cmd(),
                         ("run.dir=", "is a file, not a directory", "choose another run.dir"),
                         setup=lambda work: (work / "run").write_text("a user's file")),
    "run-dir-under-file": Case("`run.dir` under a regular file", lambda work: run_cmd()(work)[:2] + [
                               f"run.dir={work / 'file' / 'run'}"],
                               ("run.dir=", "is a file, so no directory can be made under it", "choose another run.dir"),
                               setup=lambda work: (work / "file").write_text("a user's file")),
    "run-name-long": Case("a 300-character `run.name`", lambda work: ["run", str(TINY), "run.name=" + "a" * 300],
                          ("run.name='aaaa", "(300 characters): at most 100 characters", "choose a shorter name")),
    "override-digits": Case("a 5,000-digit override value (`train.steps=111...`)", run_cmd("train.steps=" + "1" * 5000),
                            ("train.steps=1111", "(5000 characters): not a value", "Exceeds the limit")),
    "override-yaml": Case("an override value that is not YAML (`train.steps=[1,`)", run_cmd("train.steps=[1,"),
                          ("train.steps=[1,: not a value", "in quotes")),
    "override-huge-int": Case("an integer beyond 64 bits (`train.steps=` 30 nines)", run_cmd("train.steps=" + "9" * 30),
                              ("train.steps=999", "out of range")),
    "skip-fraction": Case("`train.max_skipped_fraction=1.5`", run_cmd("train.max_skipped_fraction=1.5"),
                          ("train.max_skipped_fraction=1.5", "must be in [0, 1]")),
    "export-to-file": Case("`distill export RUN --hf FILE` (a regular file)",
                           lambda work: ["export", str(work / "run"), "--hf", str(work / "model.bin")],
                           ("model.bin is a file, not a directory", "choose a new directory"),
                           setup=lambda work: (work / "model.bin").write_text("a user's file")),
    "export-non-empty": Case("`distill export RUN --hf DIR` where DIR holds files",
                             lambda work: ["export", str(work / "run"), "--hf", str(work / "out")],
                             ("out is not empty", "--overwrite"),
                             setup=lambda work: ((work / "out").mkdir(), (work / "out" / "notes.txt").write_text("x"))),
    "metap-base-key": Case("MetaP base with an unknown model field (`students.0.optim.metap_base={hidden: 8}`)",
                           run_cmd("students.0.optim={{metap_base: {{hidden: 8}}}}"),
                           ("students[0].optim.metap_base.hidden", "Did you mean 'hidden_size'?")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_one_clear_message_and_nothing_written(name, tmp_path, capsys, monkeypatch,
                                                                             digests, reliability_record):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    case.setup(work)
    monkeypatch.chdir(work)  # a relative default (runs/...) would land here
    before = digests(work)
    code = cli.main(case.argv(work))
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1] if err.strip() else ""
    assert code != 0, f"exit code {code}: {err[-2000:]}"
    for fragment in case.expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert digests(work) == before, "the command wrote or changed files"
    reliability_record("bad_input", case=name, input=case.input, exit=code,
           message=message.replace(str(work), "WORK").replace(str(TINY.parent), "tests/configs"))


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only bind mount (root ignores chmod; a read-only file system stops it too);
    skipped where this process may not mount."""
    source, mount = tmp_path / "source", tmp_path / "read-only"
    source.mkdir()
    mount.mkdir()
    result = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(mount)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"no read-only bind mount here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_run_dir_on_a_read_only_file_system_is_refused(read_only_folder, capsys, reliability_record):
    code = cli.main(["run", str(TINY), f"run.dir={read_only_folder / 'run'}"])
    message = capsys.readouterr().err.strip()
    assert code == 2 and len(message.splitlines()) == 1, message
    assert f"{read_only_folder} is not writable (a read-only file system, or no permission)" in message
    assert not any(read_only_folder.iterdir())
    reliability_record("bad_input", case="run-dir-read-only", input="`run.dir` on a read-only bind mount", exit=code,
                       message=message.replace(str(read_only_folder), "RO"))


def test_non_utf8_bytes_are_accepted_by_the_byte_tokenizer(tmp_path):
    """The decision for non-UTF-8 text: the byte tokenizer takes any bytes (a model of bytes)."""
    text_that_is_not_utf8(tmp_path)
    from distill.data import DataConfig, build_data

    data = build_data(DataConfig(source=str(tmp_path / "corpus"), seq_len=16, batch_size=2), seed=0)
    assert np.isin(np.frombuffer(b"\xe9", np.uint8)[0], np.asarray(data.train.tokens)) or \
        np.isin(np.frombuffer(b"\xe9", np.uint8)[0], np.asarray(data.validation.tokens))
