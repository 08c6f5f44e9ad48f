"""A local teacher on vLLM's offline engine (continuous batching, paged KV cache): much faster on a CUDA GPU."""
from __future__ import annotations

from typing import Any

from distill.errors import DistillError
from distill.teachers.backend import Completion, Failure, Messages, Result, SamplingParams

NOT_INSTALLED = ("teacher.engine: vllm is not installed (pip install vllm; it needs a CUDA GPU; or serve the teacher with "
                 "`vllm serve` in an environment of its own and give teacher.endpoint)")


def first_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def import_vllm(key: str = "teacher.engine", not_installed: str = NOT_INSTALLED) -> Any:
    """The vllm module, or a one-line DistillError naming the recipe key when it is missing or cannot be imported."""
    try:
        import vllm
    except ModuleNotFoundError as err:
        if err.name == "vllm":
            raise DistillError(not_installed) from None
        raise DistillError(f"{key}: vllm could not be imported ({first_line(err)})") from None
    except ImportError as err:  # installed but broken, e.g. built for another torch or CUDA
        raise DistillError(f"{key}: vllm could not be imported ({first_line(err)})") from None
    return vllm


def best_logprobs(step: dict, k: int) -> list[tuple[int, float]]:
    """The k best (token id, log-prob) of one step, best first; vLLM may add the sampled token as a k+1st."""
    pairs = [(int(token_id), float(getattr(entry, "logprob", entry))) for token_id, entry in step.items()]
    return sorted(pairs, key=lambda pair: -pair[1])[:k]


class VLLMBackend:
    """A TeacherBackend over `vllm.LLM`: one engine, loaded once, that answers every batch it is given."""

    def __init__(self, model: str, *, name: str | None = None, batch_size: int = 8, dtype: str = "auto",
                 seed: int = 0, trust_remote_code: bool = False, max_logprobs: int | None = None,
                 **engine_options: Any):
        self._vllm = import_vllm()
        self.name = name or model
        self.batch_size = batch_size
        options = dict(model=model, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code, **engine_options)
        if max_logprobs is not None:  # vLLM refuses requests for more log-probs than the engine was built with
            options["max_logprobs"] = max_logprobs
        try:
            self.llm = self._vllm.LLM(**options)
        except Exception as err:  # no GPU, unknown architecture, out of memory...: one line, not a vLLM traceback
            raise DistillError(f"teacher.model: vllm could not load {model} ({first_line(err)})") from None

    def sampling_params(self, params: SamplingParams) -> Any:
        """Our SamplingParams as vLLM's (temperature 0 is greedy there too)."""
        options: dict = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                         "top_p": params.top_p, "stop": list(params.stop)}
        if params.temperature > 0:  # the seed only matters when sampling
            options["seed"] = params.seed
        if params.top_logprobs > 0:
            options["logprobs"] = params.top_logprobs
        return self._vllm.SamplingParams(**options)

    def generate(self, conversations: list[Messages], params: SamplingParams) -> list[Result]:
        """One result per conversation, in order; failures (recorded, retried next run) are returned, not raised."""
        if not conversations:
            return []
        try:
            outputs = self.llm.chat(conversations, self.sampling_params(params), use_tqdm=False)
        except Exception as err:  # e.g. one prompt longer than the engine's max_model_len refuses the whole call
            if len(conversations) == 1:
                return [Failure(error=first_line(err))]
            # One by one, so a bad conversation fails alone instead of failing its batch on every run.
            return [result for c in conversations for result in self.generate([c], params)]
        if len(outputs) != len(conversations):
            error = f"vllm returned {len(outputs)} outputs for {len(conversations)} conversations"
            return [Failure(error=error) for _ in conversations]
        return [self._result(output, params) for output in outputs]

    def _result(self, output: Any, params: SamplingParams) -> Result:
        """One vLLM RequestOutput as a Completion (its first and only sample)."""
        try:
            sample = output.outputs[0]
            token_ids = list(sample.token_ids)
            top = None
            if params.top_logprobs > 0:
                top = [best_logprobs(step, params.top_logprobs) for step in sample.logprobs or []]
            return Completion(
                text=(sample.text or "").strip(),
                finish_reason="length" if sample.finish_reason == "length" else "stop",
                prompt_tokens=len(output.prompt_token_ids or []),
                new_tokens=len(token_ids),
                token_ids=token_ids,
                top_logprobs=top,
                prompt_ids=list(output.prompt_token_ids or []) or None,  # lets the cache check the context
            )
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            return Failure(error=f"unexpected vllm output: {first_line(err)}")
