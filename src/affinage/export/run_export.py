"""``affinage export RUN --format FORMAT --output DIR``: a run, shipped where people run models.

Every export is built in ``DIR.partial`` and becomes ``DIR`` only once it has been checked:
a GGUF is loaded in llama.cpp and answers the run's test split as a client would (its own chat
template, greedy), and must agree with affinage on at least ``min_agreement`` of the prompts;
an Ollama TEMPLATE is rendered by Go's text/template, as Ollama renders it, and must produce
exactly the training prompt. A failed check leaves ``DIR.partial`` for inspection and exits
non-zero; ``check=False`` skips it (and says so in ``affinage_export.json``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from affinage.data.template import encode_prompt, tokenizer_adds
from affinage.errors import AffinageError
from affinage.export.card import write_card
from affinage.export.chat_template import run_chat_template
from affinage.export.export_checks import GGUF_FORMATS, check_gguf, check_ollama_template, require_checkers
from affinage.export.gguf_lora import write_adapter_gguf
from affinage.export.gguf_vocab import gguf_vocab
from affinage.export.gguf_write import check_quant, write_model_gguf
from affinage.export.merge import save_merged
from affinage.export.ollama import go_template, modelfile_text, stop_tokens
from affinage.export.outputs import guard_output
from affinage.lora.inject import fuse_lora
from affinage.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME

FORMATS = ("gguf", "gguf-lora", "ollama", "peft", "merged")
CARD_KIND = {"gguf": "gguf", "gguf-lora": "gguf", "ollama": "ollama", "peft": "adapter", "merged": "merged"}
REPORT_NAME = "affinage_export.json"


@dataclass
class ExportOptions:
    quant: str = "q8_0"  # gguf, ollama: f16 | q8_0 | q4_0
    adapter: bool = False  # ollama: FROM base.gguf + ADAPTER adapter.gguf instead of the merged model
    check: bool = True  # verify in llama.cpp / Go before the export is declared written
    min_agreement: float = 0.95  # share of test prompts where llama.cpp answers exactly like affinage
    check_tokens: int = 32  # new tokens generated and compared per prompt
    check_limit: int | None = None  # compare on the first N test rows only (None: all)


@dataclass
class Shipment:
    """What an export writes, and what the checks need to know about it."""

    run: Any
    directory: Path
    options: ExportOptions
    chat_template: str | None
    chat_exact: bool
    drop_bos: bool = False  # the GGUF's tokenizer adds the BOS, so Ollama's TEMPLATE must not write it
    model_gguf: Path | None = None
    lora_gguf: Path | None = None


def export_run(
    run_dir: str | Path,
    fmt: str,
    output: str | Path,
    options: ExportOptions | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the export of ``run_dir`` in ``fmt`` to ``output``; the report is returned and kept in the export."""
    from affinage.run import open_run
    from affinage.run_dir import RunDir

    options = options or ExportOptions()
    run_dir, output = Path(run_dir), Path(output)
    _check_request(run_dir, fmt, output, options)
    RunDir(run_dir).require(adapter=True)  # before anything loads
    checked = options.check and fmt in GGUF_FORMATS  # peft and merged are the run's own files: nothing to compare
    if checked:
        require_checkers(fmt)
    partial = output.parent / f"{output.name}.partial"
    guard_output(partial, REPORT_NAME, run_dir)
    run = open_run(run_dir, quantized=False)  # a 4-bit base is exported from its full-precision weights
    examples = _check_examples(run, options, log) if checked else []
    template, _, exact = run_chat_template(run.tokenizer, run.config.prompt.template, run.config.prompt.system)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shipment = Shipment(
        run=run,
        directory=partial,
        options=options,
        chat_template=template,
        chat_exact=exact,
        drop_bos=tokenizer_adds(run.tokenizer, run.tokenizer.bos_token_id),
    )
    report: dict[str, Any] = {"format": fmt, "run": run_dir.resolve().name, "options": asdict(options)}
    answers = _affinage_answers(run, examples, options) if examples else []
    report["files"] = WRITERS[fmt](shipment, log)
    write_card(run_dir, partial, CARD_KIND[fmt])
    try:
        if checked:
            report["checks"] = _run_checks(fmt, shipment, examples, answers, log)
    except AffinageError as error:  # llama.cpp or Go refused the files: a failed check, with its report
        report["checks"] = {"error": str(error)}
        raise ExportCheckFailed(f"{error}; the export is left in {partial}", fix="see the report") from None
    finally:
        (partial / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _fail_if_disagrees(report, partial, options)
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    report["output"] = str(output)
    return report


def _check_request(run_dir: Path, fmt: str, output: Path, options: ExportOptions) -> None:
    if fmt not in FORMATS:
        raise AffinageError(f"unknown export format '{fmt}'", where="--format", fix=f"use one of {', '.join(FORMATS)}")
    check_quant(options.quant)
    if options.adapter and fmt != "ollama":
        raise AffinageError(
            "--adapter applies to --format ollama", fix="use --format gguf-lora for a llama.cpp adapter"
        )
    guard_output(output, REPORT_NAME, run_dir)
    if not 0.0 <= options.min_agreement <= 1.0:
        raise AffinageError(f"--min-agreement {options.min_agreement} must be between 0 and 1")


def _check_examples(run: Any, options: ExportOptions, log: Callable[[str], None]) -> list:
    """The test rows both sides can answer from the same prompt (affinage cuts an over-long one)."""
    test = run.run_dir.split_path("test")
    examples = run.examples() if test.is_file() and test.stat().st_size else []
    budget = run.prompting.prompt_budget(reserve=options.check_tokens)  # what affinage's side keeps
    fitting = [
        e
        for e in examples
        if len(encode_prompt(run.tokenizer, e, run.prompting.template, run.prompting.system)) <= budget
    ]
    if not fitting:
        raise AffinageError(
            f"{run.path} has no test rows to verify the export on"
            + (f" ({len(examples)} are longer than max_seq_len - --check-tokens)" if examples else ""),
            fix="train with a test split, or pass --no-check to write the export unverified",
        )
    if len(fitting) < len(examples):
        log(f"{len(examples) - len(fitting)} test rows longer than the prompt budget ({budget} tokens) left out")
    return fitting[: options.check_limit] if options.check_limit else fitting


def _affinage_answers(run: Any, examples: list, options: ExportOptions) -> list[str]:
    """The run's own greedy answers, from the adapter model (before anything is fused)."""
    from affinage.evaluate import generate

    return generate(run.model, run.tokenizer, examples, run.prompting, max_new_tokens=options.check_tokens)


# --- writers: each fills shipment.directory and returns {role: file name} --------------------------


def _model_dir(run: Any) -> Path:
    from affinage.models import resolve_model_path

    return Path(resolve_model_path(run.config.base_model))


def _write_merged_gguf(shipment: Shipment, name: str, log: Callable[[str], None]) -> Path:
    run = shipment.run
    fuse_lora(run.model)
    vocab = gguf_vocab(run.tokenizer, _model_dir(run), run.model.config.vocab_size)
    path = shipment.directory / name
    info = write_model_gguf(
        path,
        run.model,
        vocab,
        quant=shipment.options.quant,
        chat_template=shipment.chat_template,
        name=Path(run.path).name,
    )
    log(f"wrote {path.name}: {info['architecture']}, {info['quant']}, {info['bytes'] / 1e6:.1f} MB")
    shipment.model_gguf = path
    return path


def _write_base_and_adapter(shipment: Shipment, log: Callable[[str], None]) -> dict[str, str]:
    from affinage.models import load_base_model

    run = shipment.run
    base = load_base_model(run.config.base_model, trust_remote_code=run.config.trust_remote_code).model
    vocab = gguf_vocab(run.tokenizer, _model_dir(run), base.config.vocab_size)
    base_path, lora_path = shipment.directory / "base.gguf", shipment.directory / "adapter.gguf"
    info = write_model_gguf(
        base_path,
        base,
        vocab,
        quant=shipment.options.quant,
        chat_template=shipment.chat_template,
        name=str(run.config.base_model),
    )
    lora = write_adapter_gguf(lora_path, run.run_dir.adapter_dir, base.config)
    log(
        f"wrote base.gguf ({info['quant']}, {info['bytes'] / 1e6:.1f} MB) and adapter.gguf "
        f"({lora['tensor_pairs']} LoRA pairs, alpha {lora['alpha']:g})"
    )
    shipment.model_gguf, shipment.lora_gguf = base_path, lora_path
    return {"base": base_path.name, "adapter": lora_path.name}


def _write_gguf(shipment: Shipment, log: Callable[[str], None]) -> dict[str, str]:
    return {"model": _write_merged_gguf(shipment, "model.gguf", log).name}


def ollama_template(shipment: Shipment) -> str:
    """The Modelfile TEMPLATE: the exported chat template in Go; the raw prompt when the run has no chat form."""
    tokenizer = shipment.run.tokenizer
    if not shipment.chat_exact or not shipment.chat_template:
        return "{{ .Prompt }}"
    return go_template(
        shipment.chat_template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        default_system=shipment.run.config.prompt.system,
        drop_bos=shipment.drop_bos,
    )


def _write_ollama(shipment: Shipment, log: Callable[[str], None]) -> dict[str, str]:
    files = _write_base_and_adapter(shipment, log) if shipment.options.adapter else _write_gguf(shipment, log)
    tokenizer, config = shipment.run.tokenizer, shipment.run.config
    stops = (
        stop_tokens(shipment.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        if shipment.chat_exact and shipment.chat_template
        else [tokenizer.eos_token]
    )
    generation = config.generation
    parameters = {
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "num_predict": generation.max_new_tokens,
        "num_ctx": max(2048, config.trainer.max_seq_len),
    }
    text = modelfile_text(
        gguf_name="model.gguf",
        template=ollama_template(shipment),
        stops=stops,
        system=config.prompt.system,
        parameters=parameters,
        adapter_name="adapter.gguf" if shipment.options.adapter else None,
        base_name="base.gguf",
    )
    (shipment.directory / "Modelfile").write_text(text, encoding="utf-8")
    log(f"wrote Modelfile ({len(stops)} stop strings)")
    return {**files, "modelfile": "Modelfile"}


def _write_peft(shipment: Shipment, log: Callable[[str], None]) -> dict[str, str]:
    source = shipment.run.run_dir.adapter_dir
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(source / name, shipment.directory / name)
    return {"config": CONFIG_NAME, "weights": WEIGHTS_NAME}


def _write_merged(shipment: Shipment, log: Callable[[str], None]) -> dict[str, str]:
    fuse_lora(shipment.run.model)
    info = save_merged(shipment.run, shipment.directory)
    log(f"wrote the merged model ({info['dtype']}); chat template: {info['chat_template']}")
    return {"model": "model.safetensors", "config": "config.json"}


WRITERS: dict[str, Callable[[Shipment, Callable[[str], None]], dict[str, str]]] = {
    "gguf": _write_gguf,
    "gguf-lora": _write_base_and_adapter,
    "ollama": _write_ollama,
    "peft": _write_peft,
    "merged": _write_merged,
}


# --- checks --------------------------------------------------------------------------------------


def _run_checks(fmt: str, shipment: Shipment, examples: list, answers: list[str], log: Callable[[str], None]) -> dict:
    checks: dict[str, Any] = {}
    if shipment.model_gguf is not None:
        checks["llama.cpp"] = check_gguf(shipment, examples, answers)
        found = checks["llama.cpp"]
        log(
            f"llama.cpp vs affinage on {found['n']} test prompts: {found['agreement']:.1%} same greedy answer, "
            f"{found['token_agreement']:.1%} same next token, {found['same_prompt_tokens']:.1%} same prompt tokens"
        )
    if fmt == "ollama":
        checks["ollama_template"] = check_ollama_template(shipment, examples)
        found = checks["ollama_template"]
        unsent = (
            f" ({found['no_chat_form']} Alpaca rows with an input have no chat form)" if "no_chat_form" in found else ""
        )
        if "note" in found:
            log(f"Ollama TEMPLATE: {found['note']}")
        else:
            same = f"{found['same']}/{found['n']}"
            log(f"Ollama TEMPLATE rendered by Go: {same} prompts exactly the training prompt{unsent}")
    return checks


def _fail_if_disagrees(report: dict[str, Any], partial: Path, options: ExportOptions) -> None:
    checks = report.get("checks", {})
    llama = checks.get("llama.cpp")
    if llama is not None and llama[llama["gate"]] < options.min_agreement:
        what = "answers" if llama["gate"] == "agreement" else "next tokens (given the same prefix)"
        raise ExportCheckFailed(
            f"llama.cpp gives affinage's {what} on {llama[llama['gate']]:.1%} of the test prompts, below "
            f"--min-agreement {options.min_agreement:.0%}; the export is left in {partial} (see {REPORT_NAME})",
            fix="look at the differences in the report; a lower --quant loses less (f16), or pass --no-check",
        )
    if llama is not None and llama["same_prompt_tokens_chat_form"] < options.min_agreement:
        raise ExportCheckFailed(
            f"llama.cpp's prompt tokens differ from training on {1 - llama['same_prompt_tokens_chat_form']:.1%} of "
            f"the test prompts a chat client can send: the file's tokenizer or chat template is not the run's; "
            f"the export is left in {partial}",
            fix="report this as a bug with the export report; --format merged is the fallback",
        )
    template = checks.get("ollama_template")
    if template is not None and template["same"] < template["n"]:
        raise ExportCheckFailed(
            f"the Modelfile TEMPLATE, rendered by Go as Ollama does, differs from the training prompt on "
            f"{template['n'] - template['same']} of {template['n']} prompts; the export is left in {partial}",
            fix="use a named prompt.template (chatml, llama3...), or write the TEMPLATE by hand",
        )


class ExportCheckFailed(AffinageError):
    """The export was written but does not behave like the run: it stays in DIR.partial."""
