"""One interface for every teacher that writes text: an in-process model, an OpenAI-compatible server, vLLM."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Union

from distill.errors import DistillError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    """How a teacher answers; part of every record's content address, so changing one regenerates."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # > 0: also return the teacher's top-k log-probs at each generated token
    # Longer prompts are not sent (generate skips or refuses them); None: the teacher's context - max_new_tokens,
    # where the backend knows its context. Not part of the identity: it decides which prompts, not their answers.
    max_prompt_tokens: int | None = None

    def identity(self) -> dict:
        """The fields that change what the teacher writes (the seed only matters when sampling)."""
        out = asdict(self)
        out.pop("top_logprobs")
        out.pop("max_prompt_tokens")
        if self.temperature == 0:
            out.pop("seed")
            out.pop("top_p")
        return out


@dataclass
class TokenScores:
    """A model's scores of a given token sequence: at position j, the log-prob of token j given the tokens before
    it and the top-k (id, log-prob) there; position 0 has none (None)."""

    token_ids: list[int]
    token_log_probs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class Completion:
    """One answer from a teacher."""

    text: str
    finish_reason: str  # "stop" (ended by itself or a stop string) or "length" (hit max_new_tokens)
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int] | None = None  # the generated ids, when the backend knows them
    # Per generated token, the teacher's best (id, log-prob) pairs, best first (params.top_logprobs of them); for an
    # answer cut at max_new_tokens a local teacher adds one more row: its distribution after the last token.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Per generated token, the log of the mass outside top_logprobs, when the backend knows it exactly.
    tail_logprobs: list[float] | None = None
    prompt_ids: list[int] | None = None  # the prompt as the teacher saw it, when the backend knows it
    vocab_size: int | None = None  # rows of the teacher's output head, when the backend knows it


@dataclass
class Failure:
    """A request that produced no answer; it is recorded, counted and retried on the next run."""

    error: str  # one line, never containing credentials
    attempts: int = 1


Result = Union[Completion, Failure]


class TeacherBackend(Protocol):
    """What the generate stage needs from a teacher."""

    name: str  # identifies the teacher in records and in their content address
    batch_size: int  # how many conversations one generate() call should get

    def generate(self, conversations: list[Messages], params: SamplingParams) -> list[Result]:
        """One result per conversation, in order; failures are returned, not raised."""
        ...


def read_api_key(env_var: str | None, setting: str) -> str | None:
    """The key held by the environment variable `env_var` (named by `setting`), or None when none is asked for."""
    if env_var is None:
        return None
    key = os.environ.get(env_var)
    if not key:
        raise DistillError(f"{setting}: ${env_var} is not set (it should hold the API key)")
    return key


def as_judge(backend: TeacherBackend, params: SamplingParams | None = None) -> Callable[[list[Messages]], list[str]]:
    """A judge callable (conversations -> texts) over any backend; failed requests judge as empty text."""
    params = params or SamplingParams(max_new_tokens=256, temperature=0.0)

    def judge(conversations: list[Messages]) -> list[str]:
        return [r.text if isinstance(r, Completion) else "" for r in backend.generate(conversations, params)]

    return judge
