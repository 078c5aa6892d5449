"""Export: merge LoRA adapters, convert to GGUF, quantize, check parity, bundle, run offline.

Library modules, in pipeline order (they import only medcritical's shared glue):

* :mod:`export.merge` - merge an adapter into the 16-bit base (transformers).
* :mod:`export.gguf` - llama.cpp's converter (isolated), quantization, metadata stamps, Ollama Modelfiles.
* :mod:`export.build` - the one GGUF builder (merge -> convert -> quantize), cached by key.
* :mod:`export.parity` - each GGUF against the merged model on dev questions.
* :mod:`export.chat`, :mod:`export.api_server` - terminal chat and an OpenAI-compatible server on a
  GGUF; llama-cpp-python only (no torch), so they run on a ``requirements-infer.txt`` install.

Stages: :mod:`export.stage` (``export``: the selected policy as stamped GGUFs with parity)
and :mod:`export.bundle` (``bundle``: what ships, its model card and checksums; ``verify``).

Nothing heavy is imported here: ``medcritical chat`` must start without torch.
"""
