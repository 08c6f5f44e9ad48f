"""The recipe's data, decided once for every stage: prompts, who answers them, the planned answers, the training set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from distill.data.examples import (
    load_teacher_data,
    read_examples,
    read_labelled,
    read_pairs,
    read_prompts,
    split_train_eval,
)
from distill.data.layouts import Example, LabelledExample, PreferencePair, Prompt
from distill.data.tokenize import EncodedExample, encode_all
from distill.errors import DistillError
from distill.recipe import Recipe
from distill.stages.facts import run_files
from distill.teachers.backend import SamplingParams
from distill.teachers.generate import Reasoning, plan_requests


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
        routed[route(g.teachers, prompt.tags)].append(prompt)
    pairs = list(zip(list(g.teachers) + [recipe.teacher], routed))
    return [(spec, chosen) for spec, chosen in pairs if chosen]


def route(teachers: Sequence, tags: Sequence[str]) -> int:
    """The index of the first of `teachers` (specs with tags) whose tags meet `tags`; len(teachers) for none (the
    recipe's teacher). One rule for generate.teachers and method.teachers."""
    return next((i for i, t in enumerate(teachers) if set(t.tags) & set(tags)), len(teachers))


def generation_settings(recipe: Recipe) -> tuple[SamplingParams, Reasoning]:
    """(sampling parameters, reasoning mode) of the recipe's generate section."""
    g = recipe.generate
    params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            seed=recipe.seed, stop=tuple(g.stop), max_prompt_tokens=g.max_prompt_tokens)
    return params, Reasoning(mode=g.reasoning, prompt=g.reasoning_prompt, marker=g.answer_marker)


def planned_ids(recipe: Recipe) -> list[str]:
    """The content addresses of the answers this recipe asks its teacher(s) for (prompts x samples)."""
    params, reasoning = generation_settings(recipe)
    ids = []
    for spec, prompts in teacher_assignments(recipe):
        ids += [r.id for r in plan_requests(prompts, spec.model, params, recipe.generate.samples,
                                            recipe.data.system_prompt, reasoning)]
    return ids


def recipe_examples(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: teacher answers and/or data.train, split unless data.eval is given."""
    files = run_files(recipe)
    examples = []
    if recipe.data.prompts is not None:
        path = files.teacher_data
        if not path.is_dir():
            raise DistillError(f"{path}: no teacher data yet; run `distill generate` (or `distill run`) first")
        if recipe.filter is not None:
            path = files.filtered_data
            if not path.is_file():
                raise DistillError(f"{path}: the recipe filters its teacher data; run `distill filter` first")
        examples += load_teacher_data(path, ids=planned_ids(recipe))
    if recipe.data.train is not None:
        examples += read_examples(recipe.path(recipe.data.train))
    if recipe.data.pairs is not None and recipe.method.kind == "dpo":  # the preferred answers: eval text
        examples += [chosen_example(p) for p in read_pairs(recipe.path(recipe.data.pairs))]
    undesirable: set[str] = set()  # kto: held-out answers labelled undesirable are not eval text
    if recipe.data.pairs is not None and recipe.method.kind == "kto":
        labelled = read_labelled(recipe.path(recipe.data.pairs))
        examples += [labelled_example(x) for x in labelled]
        undesirable = {x.id for x in labelled if not x.desirable}
    if not examples:
        raise DistillError("recipe data: no training examples")
    if recipe.data.eval is not None:
        held_out = read_examples(recipe.path(recipe.data.eval))[: recipe.data.max_eval_examples]
        return examples, held_out
    train, held_out = split_train_eval(examples, recipe.data.eval_fraction, recipe.seed, recipe.data.max_eval_examples)
    return train, [e for e in held_out if e.id not in undesirable]


def chosen_example(pair: PreferencePair) -> Example:
    """A pair's prompt with its chosen answer, under the pair's id (what eval measures; dpo trains the rest)."""
    return Example(id=pair.id, messages=pair.messages + [{"role": "assistant", "content": pair.chosen}])


def labelled_example(example: LabelledExample) -> Example:
    """A labelled answer as a conversation under its id (a desirable held-out one is what eval measures)."""
    return Example(id=example.id, messages=example.messages + [{"role": "assistant", "content": example.answer}])


def encode(recipe: Recipe, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> list[EncodedExample]:
    """Examples tokenized the way the recipe trains on them (chat template, data.max_length, system prompt)."""
    return encode_all(examples, tokenizer, recipe.data.max_length, recipe.data.system_prompt)


@dataclass
class TrainingSet:
    """The training examples and their encodings: what capture caches and train indexes, built in one place."""

    examples: list[Example]
    held_out: list[Example]
    encoded: list[EncodedExample]


def training_set(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> TrainingSet:
    """The recipe's training set, encoded with the tokenizer the student trains on."""
    examples, held_out = recipe_examples(recipe)
    return TrainingSet(examples, held_out, encode(recipe, examples, tokenizer))
