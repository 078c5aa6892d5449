"""A policy (base + LoRA adapter) as GGUF files, for llama.cpp: what both the rounds and the export need.

* :mod:`.merge` - merge an adapter into the 16-bit base (transformers).
* :mod:`.convert` - llama.cpp's converter (isolated), quantization, metadata stamps.
* :mod:`.build` - the one GGUF builder (merge -> convert -> quantize), cached by key.
* :mod:`.file` - read and check a GGUF's header with the standard library; open it with llama.cpp
  with one-line errors (no torch: the deployment side uses it too).

Nothing heavy is imported here.
"""
