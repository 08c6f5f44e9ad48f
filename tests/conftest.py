"""Shared fixtures: a tokenizer trained on the spot and tiny random Llama models, all offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"
TINYSTORIES_TEXT = SHARED / "data" / "tinystories" / "tinystories_val_part1.txt"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation trains a small student to imitate a large teacher.",
    "Write a short poem about the sea and the sky.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Explain why the sky is blue in one sentence.",
    "Once upon a time there was a little robot who loved to read books.",
    "Two plus two is four, and three times three is nine.",
    "List three fruits: apple, banana, cherry.",
] * 20


def require_shared(path: Path) -> Path:
    """Skip the calling test with a reason when ../shared (real models and data) is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: real models/data live in ../shared beside the checkout")
    return path


def tinystories_split(tmp_path: Path, train: int, held_out: int) -> tuple[Path, Path]:
    """The first `train` TinyStories paragraphs and `held_out` from paragraph 2000 on, as two .txt files."""
    paragraphs = require_shared(TINYSTORIES_TEXT).read_text().split("\n\n")
    train_file, held_out_file = tmp_path / "train.txt", tmp_path / "held_out.txt"
    train_file.write_text("\n\n".join(paragraphs[:train]))
    held_out_file.write_text("\n\n".join(paragraphs[2000:2000 + held_out]))
    return train_file, held_out_file


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 320) with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def make_tiny_llama(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_pad_to: int | None = None,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    """Save a random LlamaForCausalLM with the fixture tokenizer to out_dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    if vocab_pad_to:
        vocab = -(-vocab // vocab_pad_to) * vocab_pad_to
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 2-layer Llama teacher (hidden 64) on the fixture tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), tiny_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A smaller random Llama student (hidden 32, 1 layer) on the same tokenizer."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("student"), tiny_tokenizer_dir, hidden=32, layers=1, heads=2, kv_heads=1,
        intermediate=64, seed=1,
    )


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A SentencePiece-style BPE (`▁` for spaces, `<0xNN>` byte fallback, no chat template), vocab 400."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces])
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = spec["added_tokens"][:3]  # byte pieces are vocabulary entries, not added tokens
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    out = tmp_path_factory.mktemp("sp_tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sp_student_dir(tmp_path_factory, sp_tokenizer_dir) -> Path:
    """A random 1-layer Llama student on the SentencePiece-style tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("sp_student"), sp_tokenizer_dir, hidden=32, layers=1, heads=2,
                           kv_heads=1, intermediate=64, seed=4)


@pytest.fixture()
def pairs_jsonl(tmp_path) -> Path:
    """A small prompt/response JSONL file."""
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"The answer is {2 * i}."}
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(run_dir: Path, teacher_dir: Path, data: Path, **sections) -> dict:
    """A recipe over the fixture teacher that trains in about a second."""
    recipe = {
        "output_dir": str(run_dir),
        "seed": 3,
        "teacher": {"model": str(teacher_dir)},
        "student": {"config": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1,
                               "intermediate_size": 64}},
        "data": {"train": str(data), "max_length": 48, "eval_fraction": 0.2},
        "method": {"kind": "kd", "divergence": "forward_kl", "alpha": 0.5, "temperature": 2.0, "chunk_size": 16},
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 2,
                  "log_every": 1, "keep_checkpoints": 5},
        "eval": {"max_new_tokens": 4, "batch_size": 4, "speed_prompt_tokens": 8, "speed_new_tokens": 4},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def logged_steps(run_dir: Path) -> list[dict]:
    """The training-step rows of <run_dir>/metrics.jsonl (held-out evaluation rows, "split": "eval", left out)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") != "eval"]


def logged_evals(run_dir: Path) -> list[dict]:
    """The held-out evaluation rows of <run_dir>/metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "eval"]
