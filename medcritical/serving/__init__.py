"""Served engines: the policy sampled through an OpenAI-compatible server.

Rollouts, corrections and dev evaluations are most of the method's compute.
The in-process engines (:mod:`medcritical.engines`) decode one sequence at a
time (llama.cpp) or in fixed batches (transformers); a server batches many
sequences. This package puts such servers behind the project's ``Engine``
protocol, one module per job:

* :mod:`.client` - :class:`~.client.OpenAIEngine`, the OpenAI SDK client (its
  own retries, one-line errors) and the chat-template renderer;
* :mod:`.process` - :class:`~.process.ManagedServer`: start, wait for, log and
  stop a server process that dies with its parent;
* :mod:`.llamacpp` - :class:`~.llamacpp.LlamaCppServer`, llama-cpp-python's server on a GGUF;
* :mod:`.vllm` - vLLM's venv, :class:`~.vllm.VllmServer` and runtime LoRA on a user-run endpoint.

Nothing heavy (openai, llama_cpp, transformers) is imported at import time.
"""
