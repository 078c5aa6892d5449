"""MedCritical: self-collaborative correction for small medical reasoning models.

Stages (one module each): data -> teach -> sft -> selfplay/dpo (rounds) ->
export (merge, gguf, parity) -> evaluate, chat, serve.
"""

__version__ = "0.1.0"
