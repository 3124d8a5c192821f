"""Co-distillation step benchmark: the machine's matmul limit, then the whole step against it and
against the same step written in PyTorch with transformers' Llama 4.

    python experiments/bench/step.py              # full run (about 20 minutes on a 2-core CPU)
    python experiments/bench/step.py --quick      # a few minutes: fewer configs and repeats
    python experiments/bench/step.py --out docs/bench-step.md --sections roofline,codistill

Sections (all in one process, so every ratio is measured side by side; times are medians of
round-robin repeats after an excluded warm-up):

1. roofline: a large float32 and bfloat16 matmul through XLA, GFLOP/s. The denominator of MFU.
2. codistill: the real jitted co-distillation step (`distill.setup.compiled_step` on
   `initial_state` and `random_batch`) of the quickstart config and of a larger one (teacher 47.5M
   total / 12.1M active parameters), with the teacher co-trained and frozen: tokens/s and MFU.
   Model FLOPs per step: 3x the forward FLOPs (`ModelConfig.forward_flops_per_token`: active
   parameters plus attended keys) for every model that trains, 1x for a frozen teacher.
3. mfu: one model's training step (value_and_grad of the cross entropy) at d_model 512 and 768, MFU
   against the float32 roofline (issue target: >= 40% on CPU).
4. amortise: the co-trained step with one student and with two; the second student should cost
   no more than its own forward+backward (the student's training step alone) plus 10%.
5. torch: the same co-distillation step (teacher CE; each student 0.5 CE + 0.5 forward KL from the
   teacher's detached distribution; gradient clipping and AdamW for all three) with
   `transformers.Llama4ForCausalLM` models, eager, at 8, 16 and 64 teacher experts (students half
   as many): the ratio ours / theirs. transformers computes every expert on every token.
   torch_compile: the same under `torch.compile` at 16 experts (full run only: it compiles for
   minutes).
6. compile: compile time of the co-distillation step with a teacher of 4, 16 and 48 layers, with
   and without `scan_layers`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository before this folder: losses.py here is not `losses`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import (  # noqa: E402
    TORCH_THREADS,
    Timing,
    main,
    measure,
    ms,
    random_tokens,
    table,
    torch_llama4,
)
from model import jax_model_step  # noqa: E402

import distill  # noqa: E402
from distill.config import Config  # noqa: E402
from distill.experiment import resolve  # noqa: E402
from distill.setup import compiled_step, initial_state, random_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
# A teacher of about 50M parameters (47.5M total, 12.1M active) and two d256 students (8.0M / 2.5M).
LARGE = [
    ("teacher.model={hidden_size: 512, num_attention_heads: 8, num_key_value_heads: 4, num_hidden_layers: 6, "
     "intermediate_size: 512, intermediate_size_mlp: 1024, num_local_experts: 16, interleave_moe_layer_step: 2}"),
    *[f"students.{i}.model={{hidden_size: 256, num_attention_heads: 8, num_key_value_heads: 4, "
      f"intermediate_size: 256, intermediate_size_mlp: 512, num_local_experts: 8}}" for i in (0, 1)],
]
FROZEN = ["teacher.trainable=false", "teacher.warmup_fraction=null", "teacher.warmup_steps=0"]


def load(*overrides: str) -> Config:
    return distill.load_config(QUICKSTART, list(overrides))


# --------------------------------------------------------------------------- measurements


def matmul_timing(name: str, size: int, dtype) -> Timing:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    product = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    return Timing(name, lambda: jax.block_until_ready(product(a, b)))


def step_timing(name: str, cfg: Config, *, with_students: bool = True) -> Timing:
    """The compiled step of `cfg` on fresh state, run repeatedly on one random batch."""
    start = time.perf_counter()
    step = compiled_step(cfg, with_students=with_students)
    compile_s = time.perf_counter() - start
    holder = {"state": initial_state(cfg)}
    batch = random_batch(cfg)

    def run():
        holder["state"], metrics = step(holder["state"], batch)  # the old state is donated
        jax.block_until_ready(metrics)

    return Timing(name, run, compile_s)


def step_flops(cfg: Config) -> float:
    """Model FLOPs of one step: 3 forwards for each model that trains, 1 for a frozen teacher."""
    teacher, students = resolve(cfg).forward_flops_per_step()
    return teacher * (3 if cfg.teacher.trains else 1) + 3 * sum(students)


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9


def mfu(flops: float, seconds: float, peak_gflops: float) -> str:
    return f"{100 * gflops(flops, seconds) / peak_gflops:.1f}%"


def params(cfg) -> str:
    counts = cfg.param_counts()
    return f"{counts['total'] / 1e6:.1f}M / {counts['active'] / 1e6:.1f}M"


def roofline(results: dict) -> float:
    """The float32 matmul rate measured in this run (section 1 runs first when it is chosen)."""
    if "roofline" not in results:
        section_roofline(None, results)
    return results["roofline"]["float32"]


# --------------------------------------------------------------------------- sections


def section_roofline(plan, results):
    size = (plan or {}).get("matmul", 2048)
    timings = [matmul_timing("float32", size, jnp.float32), matmul_timing("bfloat16", size, jnp.bfloat16)]
    measure(timings, 5, 4.0)
    flops = 2 * size**3
    results["roofline"] = {t.name: gflops(flops, t.median) for t in timings}
    rows = [[t.name, f"{size} x {size} x {size}", ms(t.median), f"{gflops(flops, t.median):,.1f}", t.repeats]
            for t in timings]
    return ("### 1. Roofline: one matmul through XLA\n\n"
            + table(["dtype", "shape", "ms (median)", "GFLOP/s", "repeats"], rows)
            + "\n\nMFU below is model FLOPs per second over the float32 GFLOP/s of this table.")


def section_codistill(plan, results):
    peak = roofline(results)
    rows, raw = [], []
    for label, overrides in plan["codistill"]:
        for mode, extra in (("co-trained teacher", []), ("frozen teacher", FROZEN)):
            cfg = load(*overrides, *extra)
            timing = step_timing(f"{label} {mode}", cfg)
            measure([timing], plan["repeats"], plan["budget_s"])
            flops, tokens = step_flops(cfg), cfg.data.batch_size * cfg.data.seq_len
            rows.append([label, mode, params(resolve(cfg).teacher.model), params(resolve(cfg).students[0].model),
                         f"{cfg.data.batch_size} x {cfg.data.seq_len}", f"{timing.compile_s:.1f}", ms(timing.median),
                         f"{tokens / timing.median:,.0f}", f"{flops / 1e9:,.1f}", f"{gflops(flops, timing.median):,.1f}",
                         mfu(flops, timing.median, peak), timing.repeats])
            raw.append(dict(config=label, mode=mode, times_s=timing.times, compile_s=timing.compile_s, flops=flops))
    results["codistill"] = raw
    headers = ["config", "teacher is", "teacher params total / active", "each student (2)", "batch", "compile s",
               "step ms", "tokens/s", "GFLOP/step", "GFLOP/s", "MFU", "repeats"]
    return ("### 2. The co-distillation step (teacher + 2 students, AdamW, KD loss, metrics)\n\n"
            + table(headers, rows))


def section_mfu(plan, results):
    peak = roofline(results)
    rows, raw = [], []
    for d, batch, seq in plan["mfu"]:
        cfg = resolve(load()).students[0].model.replace(
            hidden_size=d, intermediate_size=2 * d, intermediate_size_mlp=4 * d, num_attention_heads=d // 64,
            num_key_value_heads=d // 128, num_local_experts=8)
        timing = measure([jax_model_step(f"d{d}", cfg, batch, seq)], plan["repeats"], plan["budget_s"])[0]
        flops = 3 * cfg.forward_flops_per_token(seq) * batch * seq
        rows.append([d, params(cfg), f"{batch} x {seq}", ms(timing.median), f"{gflops(flops, timing.median):,.1f}",
                     mfu(flops, timing.median, peak), timing.repeats])
        raw.append(dict(d=d, times_s=timing.times, flops=flops))
    results["mfu"] = raw
    headers = ["d_model", "params total / active", "batch", "step ms", "GFLOP/s", "MFU", "repeats"]
    return ("### 3. One model's training step (value_and_grad of the cross entropy), 4 layers, 8 experts "
            "top-1, ff 2d / 4d\n\n" + table(headers, rows) + "\n\nTarget: MFU >= 40% at d_model >= 512.")


def section_amortise(plan, results):
    one = load("students=[{name: distilled, preset: cpu-student}]")
    two = load()
    student = resolve(two).students[0].model
    batch, seq = two.data.batch_size, two.data.seq_len
    timings = [step_timing("teacher + 1 student", one), step_timing("teacher + 2 students", two),
               jax_model_step("the student alone", student, batch, seq)]
    # A difference of two step times over a third: more repeats than the other sections.
    measure(timings, plan["amortise_repeats"], plan["amortise_repeats"] * 2.0)
    t1, t2, alone = (t.median for t in timings)
    ratio = (t2 - t1) / alone
    ratio_min = (timings[1].min - timings[0].min) / timings[2].min
    results["amortise"] = dict(times_s={t.name: t.times for t in timings}, ratio=ratio, ratio_min=ratio_min)
    rows = [[t.name, ms(t.median), ms(t.min), t.repeats] for t in timings]
    verdict = "met" if ratio <= 1.1 else "NOT met"
    return ("### 4. Teacher forward amortised over students (quickstart shapes, co-trained teacher)\n\n"
            + table(["step", "ms (median)", "ms (min)", "repeats"], rows)
            + f"\n\nThe second student costs {ms(t2 - t1)} ms = {ratio:.2f}x its own training step "
              f"(from the minima: {ratio_min:.2f}x; target <= 1.10: {verdict}).")


def torch_codistill_timing(name: str, cfg: Config, compiled: bool) -> Timing:
    import torch

    models = [torch_llama4(model) for _, model in resolve(cfg).models()]
    forwards = [torch.compile(m) if compiled else m for m in models]
    optimizer = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=1e-3, weight_decay=0.1)
    ids = torch.from_numpy(random_tokens(cfg.data.batch_size, cfg.data.seq_len, 256, 1).astype("int64"))
    tokens, targets = ids[:, :-1].contiguous(), ids[:, 1:].reshape(-1)

    def run():
        optimizer.zero_grad(set_to_none=True)
        teacher_logits = forwards[0](input_ids=tokens, use_cache=False).logits.float().flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(teacher_logits, targets)
        teacher_logp = torch.log_softmax(teacher_logits.detach(), -1)
        for forward in forwards[1:]:
            logits = forward(input_ids=tokens, use_cache=False).logits.float().flatten(0, 1)
            kl = (teacher_logp.exp() * (teacher_logp - torch.log_softmax(logits, -1))).sum(-1).mean()
            loss = loss + 0.5 * torch.nn.functional.cross_entropy(logits, targets) + 0.5 * kl
        loss.backward()
        for model in models:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return Timing(name, run)


def torch_config(experts: int) -> Config:
    """The quickstart with `experts` teacher experts, students half as many, both students distilled."""
    return load(f"teacher.model.num_local_experts={experts}", "students.1.control=false",
                *[f"students.{i}.model={{num_local_experts: {experts // 2}}}" for i in (0, 1)])


def section_torch(plan, results):
    import torch

    torch.set_num_threads(TORCH_THREADS)
    rows, raw = [], []
    for experts in plan["torch_experts"]:
        cfg = torch_config(experts)
        ours, eager = measure([step_timing("ours", cfg), torch_codistill_timing("transformers eager", cfg, compiled=False)],
                              plan["repeats"], plan["budget_s"])
        rows.append([experts, experts // 2, ms(ours.median), ms(eager.median), f"{ours.median / eager.median:.2f}",
                     f"{ours.min / eager.min:.2f}", f"{ours.repeats}/{eager.repeats}"])
        raw.append(dict(experts=experts, ours_s=ours.times, eager_s=eager.times))
    results["torch"] = raw
    headers = ["teacher experts", "student experts", "ours ms", "transformers eager ms", "ours / eager (medians)",
               "(minima)", "repeats"]
    return (f"### 5. The same co-distillation step in PyTorch (torch {torch.__version__}, {TORCH_THREADS} threads, "
            f"transformers `Llama4ForCausalLM`, sdpa attention, eager), quickstart shapes\n\n" + table(headers, rows)
            + "\n\nTarget: ours at least 3x faster than eager (ratio <= 0.33) at 16 experts, and faster at every "
              "count.")


def section_torch_compile(plan, results):
    import torch

    torch.set_num_threads(TORCH_THREADS)
    rows, raw = [], []
    for experts in plan["torch_compile_experts"]:
        cfg = torch_config(experts)
        ours = step_timing("ours", cfg)
        try:
            compiled = torch_codistill_timing("transformers torch.compile", cfg, compiled=True)
            measure([ours, compiled], plan["repeats"], plan["budget_s"])  # the warm-up compiles
            rows.append([experts, ms(ours.median), ms(compiled.median), f"{compiled.warmup_s:.0f}",
                         f"{ours.median / compiled.median:.2f}", f"{ours.repeats}/{compiled.repeats}"])
            raw.append(dict(experts=experts, ours_s=ours.times, compiled_s=compiled.times, first_s=compiled.warmup_s))
        except Exception as error:  # noqa: BLE001  (the table reports what torch.compile did on this machine)
            traceback.print_exc()
            failure = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            rows.append([experts, "-", failure, "-", "-", "-"])
            raw.append(dict(experts=experts, failure=failure))
    results["torch_compile"] = raw
    if not rows:
        return "### 5b. transformers under torch.compile: not run (its compile takes minutes; full run only)"
    headers = ["teacher experts", "ours ms", "transformers torch.compile ms", "first call s (compiles)",
               "ours / compiled", "repeats"]
    return "### 5b. The same step in transformers under `torch.compile` (inductor)\n\n" + table(headers, rows)


def section_compile(plan, results):
    rows, raw = [], []
    for layers in plan["compile_layers"]:
        cells = []
        for scan in (False, True):
            cfg = load(f"teacher.model.num_hidden_layers={layers}", f"teacher.model.scan_layers={str(scan).lower()}",
                       *[f"students.{i}.model.scan_layers={str(scan).lower()}" for i in (0, 1)])
            start = time.perf_counter()
            compiled_step(cfg)
            seconds = time.perf_counter() - start
            cells.append(f"{seconds:.1f}")
            raw.append(dict(layers=layers, scan=scan, compile_s=seconds))
        rows.append([layers, *cells])
    results["compile"] = raw
    return ("### 6. Compile time of the co-distillation step (quickstart students; teacher of L layers)\n\n"
            + table(["teacher layers", "compile s, unrolled", "compile s, scan_layers"], rows))


SECTIONS = {"roofline": section_roofline, "codistill": section_codistill, "mfu": section_mfu,
            "amortise": section_amortise, "torch": section_torch, "torch_compile": section_torch_compile,
            "compile": section_compile}


def make_plan(quick: bool) -> dict:
    if quick:
        return dict(repeats=3, budget_s=3.0, amortise_repeats=5, matmul=1024, codistill=[("quickstart", [])],
                    mfu=[(512, 2, 256)], torch_experts=[8], torch_compile_experts=[], compile_layers=[4, 16])
    return dict(repeats=5, budget_s=10.0, amortise_repeats=15, matmul=2048,
                codistill=[("quickstart", []), ("large", LARGE)], mfu=[(512, 4, 512), (768, 4, 512)],
                torch_experts=[8, 16, 64], torch_compile_experts=[16], compile_layers=[4, 16, 48])


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # the compile workers would share our 2 cores
    main("Co-distillation step benchmark", __doc__, SECTIONS, make_plan)
