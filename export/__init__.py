"""Export: the top layer. The selected policy as checked GGUFs, what ships, and running it offline.

Stages: :mod:`export.stage` (``export``: the selected policy as stamped GGUFs with parity)
and :mod:`export.bundle` (``bundle``: what ships, its model card and checksums; ``verify``).

Library modules:

* :mod:`export.parity` - each GGUF against the merged model on dev questions.
* :mod:`export.modelfile` - Ollama Modelfiles next to the GGUFs.
* :mod:`export.chat`, :mod:`export.api_server` - terminal chat and an OpenAI-compatible server on a
  GGUF; llama-cpp-python only (no torch), so they run on a ``requirements-infer.txt`` install.

These modules import medcritical (the GGUF builder is :mod:`medcritical.gguf`); medcritical's
library and stage modules never import them (README, "Architecture").

Nothing heavy is imported here: ``medcritical chat`` must start without torch.
"""
