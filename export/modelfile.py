"""Ollama Modelfiles next to exported GGUFs: :func:`write_modelfile`."""

from __future__ import annotations

import re
from pathlib import Path

from medcritical.artifacts import atomic_write_text
from medcritical.errors import UserError
from medcritical.gguf.convert import gguf_metadata

# ChatML as a Go template for Ollama; .Messages includes the Modelfile's SYSTEM.
_OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def chatml_default_system(template: str, bos: str = "", eos: str = "") -> tuple[bool, str | None]:
    """Whether ``template`` renders plain ChatML, and the system prompt it adds when none is given.

    Rendered with llama-cpp-python's formatter (the one chat and serve use) on
    a probe conversation and compared with ChatML written out by hand.
    """
    from jinja2 import TemplateError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def render(messages: list[dict[str, str]]) -> str:
        return fmt(messages=messages).prompt

    turns = [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")]
    chatml = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + "<|im_start|>assistant\n"
    try:
        if render([{"role": r, "content": c} for r, c in turns]) != chatml:
            return False, None
        alone = render([{"role": "user", "content": "U1"}])
    except TemplateError:  # a template that rejects the probe conversation is not plain ChatML
        return False, None
    tail = "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
    m = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", alone.removesuffix(tail), re.S)
    return True, m.group(1) if m and alone.endswith(tail) else None


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UserError(f'Modelfile: cannot quote text containing """: {text[:40]!r}')
    return f'"""{text}"""'


def write_modelfile(gguf: str | Path, n_ctx: int = 4096, num_predict: int = 1024, system: str | None = None) -> Path:
    """Write ``<gguf stem>.Modelfile`` next to the GGUF for ``ollama create NAME -f ...``.

    ChatML models get a TEMPLATE equal to their chat template (checked by
    rendering) and the turn markers as stop words. Other templates get no
    TEMPLATE: Ollama then reads the one in the GGUF. ``system`` (the kit's
    system prompt, :data:`medcritical.prompts.SYSTEM` for the run's language:
    what the student was trained and evaluated with) is written as SYSTEM;
    without it, a ChatML template's own default system prompt is. Greedy
    decoding and the context mirror ``medcritical eval``'s defaults, so answers
    match the parity report.
    """
    gguf = Path(gguf)
    meta = gguf_metadata(gguf)
    template = meta.get("tokenizer.chat_template", "")
    eos = meta["eos_text"]
    is_chatml, default = chatml_default_system(template, meta["bos_text"], eos) if template else (False, None)
    system = system if system is not None else (default if is_chatml else None)
    lines = [f"# Ollama: ollama create NAME -f {gguf.stem}.Modelfile", f"FROM ./{gguf.name}"]
    stops = [eos] if eos else []
    if is_chatml:
        lines.append(f"TEMPLATE {_quoted(_OLLAMA_CHATML)}")
        stops += ["<|im_end|>", "<|im_start|>"]
    else:
        lines.append("# TEMPLATE: not plain ChatML; Ollama uses tokenizer.chat_template from the GGUF")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {n_ctx}", f"PARAMETER num_predict {num_predict}"]
    path = gguf.with_suffix(".Modelfile")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
