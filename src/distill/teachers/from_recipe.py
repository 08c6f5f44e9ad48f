"""The generate stage as a recipe describes it: the prompts, the sampling settings, which teacher answers which
prompts, and whether top-k log-probs are kept. Shared by the generate stage and `data.splits.planned_ids`."""
from __future__ import annotations

from distill.data.examples import Prompt, read_prompts
from distill.recipe import Recipe
from distill.teachers.backend import SamplingParams
from distill.teachers.generate import Reasoning


def recipe_prompts(recipe: Recipe) -> list[Prompt]:
    """The prompts the teacher answers: data.prompts, mapped by data.fields, cut to generate.max_prompts."""
    d = recipe.data
    prompts = read_prompts(recipe.path(d.prompts), fields=d.fields, on_error=d.on_error, split=d.prompts_split,
                           config=d.prompts_config)
    return prompts[: recipe.generate.max_prompts] if recipe.generate.max_prompts else prompts


def teacher_assignments(recipe: Recipe) -> list[tuple[object, list[Prompt]]]:
    """(teacher spec, the prompts it answers) for every teacher that answers any (mixture of teachers)."""
    prompts, g = recipe_prompts(recipe), recipe.generate
    if not g.teachers:
        return [(recipe.teacher, prompts)]
    if g.mixture == "all":
        return [(recipe.teacher, prompts)] + [(t, prompts) for t in g.teachers]
    routed: list[list] = [[] for _ in range(len(g.teachers) + 1)]  # the last: the recipe's teacher
    for prompt in prompts:
        first = next((i for i, t in enumerate(g.teachers) if set(t.tags) & set(prompt.tags)), len(g.teachers))
        routed[first].append(prompt)
    pairs = list(zip(list(g.teachers) + [recipe.teacher], routed))
    return [(spec, chosen) for spec, chosen in pairs if chosen]


def captures_at_generation(recipe: Recipe) -> bool:
    """Does the generate stage keep the teacher's top-k log-probs for the cache (generate.capture_topk)?"""
    wanted = recipe.generate.capture_topk
    if wanted is None:
        wanted = recipe.teacher.endpoint is None and recipe.teacher.cache is not None and recipe.method.kind == "kd"
    return bool(wanted)


def generation_settings(recipe: Recipe) -> tuple[SamplingParams, Reasoning]:
    """(sampling parameters, reasoning mode) of the recipe's generate section."""
    g = recipe.generate
    params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            seed=recipe.seed, stop=tuple(g.stop), max_prompt_tokens=g.max_prompt_tokens)
    return params, Reasoning(mode=g.reasoning, prompt=g.reasoning_prompt, marker=g.answer_marker)
