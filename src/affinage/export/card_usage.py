"""The card's "how to use" sections: PEFT, transformers, affinage, llama.cpp and Ollama commands."""

from __future__ import annotations

import re

from affinage.export.card_facts import RunFacts
from affinage.export.ollama import ollama_usage


def ollama_name(name: str) -> str:
    """A model name Ollama accepts: lowercase letters, digits, dots, dashes and underscores."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


def _prompt_note(facts: RunFacts) -> str:
    prompt = facts.config.get("prompt") or {}
    template = f"the `{prompt['template']}` prompt template" if prompt.get("template") else "the model's chat template"
    system = " with the run's system prompt (see the config below)" if prompt.get("system") else ""
    return f"The model was trained on prompts formatted with {template}{system}: format your prompts the same way."


def fenced(text: str, language: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def usage(facts: RunFacts, what: str, repo: str, gguf_file: str) -> str:
    if what == "adapter":
        parts = [_with_peft(facts, repo), _with_affinage_run()]
    elif what == "merged":
        parts = [_with_transformers(facts, repo), _with_affinage_download(facts, repo)]
    else:
        parts = [_with_llama_cpp(repo, gguf_file), _with_ollama(facts, what, repo, gguf_file)]
    return "## How to use\n\n" + "\n\n".join(parts)


def _with_peft(facts: RunFacts, repo: str) -> str:
    base = facts.base_hub_id or facts.base_model
    auto = (
        f"from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")'
    )
    explicit = (
        f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo}")'
    )
    local = "" if facts.base_hub_id else "\n\nThe base model is a local directory of the training machine: use a copy."
    return (
        f"### With PEFT\n\n{fenced(auto, 'python')}\n\nor, with the base model loaded yourself:\n\n"
        f"{fenced(explicit, 'python')}\n\n{_prompt_note(facts)}{local}"
    )


def _with_affinage_run() -> str:
    commands = 'affinage predict RUN "your text"\naffinage eval RUN'
    return (
        f"### With affinage\n\n{fenced(commands, 'bash')}\n\n`RUN` is the run directory this adapter was exported "
        "from (`affinage train CONFIG --output RUN`); affinage formats prompts as in training."
    )


def _generate_args(facts: RunFacts) -> str:
    sections = (facts.config.get("generation") or {}, facts.config.get("eval") or {})
    limit = next((section["max_new_tokens"] for section in sections if section.get("max_new_tokens")), None)
    return f", max_new_tokens={limit}" if limit else ""


def _with_transformers(facts: RunFacts, repo: str) -> str:
    code = (
        f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
        f'messages = [{{"role": "user", "content": "your text"}}]\n'
        f'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",\n'
        f"                                       return_dict=True)\n"
        f"output = model.generate(**inputs{_generate_args(facts)})\n"
        f'print(tokenizer.decode(output[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True))'
    )
    return (
        f"### With transformers\n\n{fenced(code, 'python')}\n\n"
        "The tokenizer's chat template formats prompts the way the model was trained."
    )


def _with_affinage_download(facts: RunFacts, repo: str) -> str:
    folder = ollama_name(facts.name)
    commands = f'hf download {repo} --local-dir {folder}\naffinage predict {folder} "your text"'
    return f"### With affinage\n\n{fenced(commands, 'bash')}"


def _gguf_layout(gguf_file: str) -> tuple[str, str]:
    """(the files to fetch, llama.cpp's model arguments): a merged file, or ``base.gguf`` + ``--lora adapter.gguf``."""
    if gguf_file == "adapter.gguf":
        return "base.gguf adapter.gguf", "-m base.gguf --lora adapter.gguf"
    return gguf_file, f"-m {gguf_file}"


def _with_llama_cpp(repo: str, gguf_file: str) -> str:
    files, arguments = _gguf_layout(gguf_file)
    commands = f"hf download {repo} {files} --local-dir .\nllama-cli {arguments} -cnv"
    return (
        f"### With llama.cpp\n\n{fenced(commands, 'bash')}\n\nllama.cpp formats the chat with the file's own template."
    )


def _with_ollama(facts: RunFacts, what: str, repo: str, gguf_file: str) -> str:
    name = ollama_name(facts.name)
    if what == "ollama":  # the export ships its Modelfile (template, stop tokens, parameters)
        fetch = f"hf download {repo} --local-dir {name}   # or use this directory as it is\ncd {name}\n"
        usage = ollama_usage(name, adapter=gguf_file == "adapter.gguf").replace("## Run with Ollama\n\n", "")
        return f"### With Ollama\n\n{fenced(fetch, 'bash')}\n\n{usage}"
    files, _ = _gguf_layout(gguf_file)
    lines = "FROM ./base.gguf\\nADAPTER ./adapter.gguf" if gguf_file == "adapter.gguf" else f"FROM ./{gguf_file}"
    commands = (
        f"hf download {repo} {files} --local-dir .\nprintf '{lines}\\n' > Modelfile\n"
        f"ollama create {name} -f Modelfile\nollama run {name}"
    )
    note = (
        "This bare Modelfile uses the chat template stored in the GGUF; `affinage export --format ollama` "
        "writes a Modelfile with the TEMPLATE, stop strings and parameters checked against training."
    )
    return f"### With Ollama\n\n{fenced(commands, 'bash')}\n\n{note}"
