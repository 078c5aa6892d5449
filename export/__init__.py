"""Export: merge LoRA adapters, convert to GGUF, quantize, check parity, run offline.

Modules, in pipeline order:

* :mod:`export.merge` - merge the final adapter(s) into the 16-bit base (transformers).
* :mod:`export.gguf` - llama.cpp's converter (isolated) + quantization + Ollama Modelfiles.
* :mod:`export.parity` - the gate: each GGUF against the merged model on dev questions.
* :mod:`export.chat`, :mod:`export.serve` - terminal chat and an OpenAI-compatible server
  on a GGUF; they import llama-cpp-python only (no torch), so they run on a machine set
  up with ``requirements-infer.txt``.
* :mod:`export.cli` - the ``export``, ``chat`` and ``serve`` subcommands.

Nothing heavy is imported here: ``medcritical chat`` must start without torch.
"""
