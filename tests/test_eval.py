import json
from pathlib import Path

import pytest

from medcritical.cli import main
from medcritical.default_model import default_gguf
from medcritical.evaluate import pick_from_logprobs, summarize


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_eval_tiny_model_transformers_generate_and_resume(tiny_llama: Path, tmp_path: Path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_llama), "--limit", "6", "--max-new-tokens", "8", "--output", str(out)]
    assert main(args) == 0
    s = _summary(out)
    assert s["n"] == 6 and s["engine"] == "transformers"
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert {"prompt", "output", "parsed", "gold", "correct"} <= rows[0].keys()
    assert "<|im_start|>user" in rows[0]["prompt"]  # went through the chat template
    assert "accuracy" in capsys.readouterr().out
    # Same command again: everything is already there, nothing regenerated.
    before = (out / "predictions.jsonl").read_text()
    assert main(args) == 0
    assert (out / "predictions.jsonl").read_text() == before
    # Other settings into the same directory are never mixed in: the old evaluation is moved aside.
    assert main(args[:-2] + ["--max-new-tokens", "4", "--output", str(out)]) == 0
    assert "moved it to" in capsys.readouterr().err
    assert list((tmp_path / ".stale").rglob("predictions.jsonl"))
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and json.loads((out / "manifest.json").read_text())["material"]["max_new_tokens"] == 4


def test_eval_loglik_4bit(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "ll"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_llama),
                "--load-in-4bit",
                "--mode",
                "loglik",
                "--limit",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    s = _summary(out)
    assert s["n"] == 8 and s["parse_rate"] == 1.0  # loglik always yields an answer


def test_eval_gguf_on_cmexam(tmp_path: Path):
    csv = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmexam" / "val-dev.csv"
    if not csv.exists():
        pytest.skip("shared CMExam data not present")
    out = tmp_path / "gg"
    args = ["eval", "--model", str(default_gguf()), "--data", str(csv), "--limit", "2", "--max-new-tokens", "48"]
    assert main(args + ["--output", str(out)]) == 0
    s = _summary(out)
    assert s["n"] == 2 and s["engine"] == "llamacpp"
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert row["output"] and "<|im_start|>assistant" in row["prompt"]


def test_gguf_loglik_matches_greedy_next_token(tmp_path: Path):
    """The llama.cpp letter scores come from the real last-position logits."""
    from medcritical.engines import LlamaCppEngine

    eng = LlamaCppEngine(default_gguf(), n_ctx=1024)
    msgs = [{"role": "user", "content": "Reply with one letter: A or B?"}]
    logits = eng.next_token_logits(eng.tokenize(eng.render(msgs)))
    first = eng.generate([msgs], max_new_tokens=1)[0][0]
    assert eng.llm.detokenize([int(logits.argmax())]).decode().strip() == first.strip()
    scores = eng.letter_logprobs([msgs], ["Answer: "], [["A", "B"]])[0]
    assert set(scores) == {"A", "B"} and all(v < 0 for v in scores.values())


def test_gguf_samples_reuse_the_prompt_with_distinct_reproducible_seeds():
    """n samples of one prompt: the prompt is evaluated once (its KV copied to the other samples), and each
    sample has its own seed, the same on every run."""
    import llama_cpp

    from medcritical.engines import LlamaCppEngine, sample_seed

    eng = LlamaCppEngine(default_gguf(), n_ctx=1024, n_threads=1)
    msgs = [{"role": "user", "content": "Name one cause of chest pain, in a few words."}]

    def decoded(n: int, seed: int) -> tuple[int, list[str]]:
        ctx = eng._streams[2].ctx if eng._streams else None
        before = (
            0 if ctx is None else llama_cpp.llama_perf_context(ctx).n_p_eval + llama_cpp.llama_perf_context(ctx).n_eval
        )
        out = eng.generate([msgs], max_new_tokens=12, temperature=1.0, top_p=1.0, n=n, seed=seed, batch_size=4)[0]
        perf = llama_cpp.llama_perf_context(eng._streams[2].ctx)
        return perf.n_p_eval + perf.n_eval - before, out

    prompt = len(eng.tokenize(eng.render(msgs)))
    decoded(4, seed=0)  # make the 4-sequence context first
    once, single = decoded(1, seed=5)
    four, samples = decoded(4, seed=5)
    assert prompt <= once <= prompt + 11 and prompt <= four <= prompt + 4 * 11  # the prompt once, not 4 times
    assert samples[0] == single[0] and len(set(samples)) > 1  # the same first draw; the others differ
    assert decoded(4, seed=5)[1] == samples  # reproducible
    assert decoded(4, seed=6)[1] != samples
    seeds = {sample_seed(s, i, j) for s in range(3) for i in range(3) for j in range(3)}
    assert len(seeds) == 27 and max(seeds) < 2**31  # seed + i + j would collide here
    # Greedy: one generation, copied.
    greedy = eng.generate([msgs], max_new_tokens=8, n=3)[0]
    assert len(greedy) == 3 and len(set(greedy)) == 1
    eng.close()


def test_summary_and_multi_answer_choice():
    rows = [
        {"multi": False, "parsed": ["A"], "correct": True},
        {"multi": False, "parsed": None, "correct": False},
        {"multi": True, "parsed": ["A", "B"], "correct": True},
        {"multi": True, "parsed": ["A"], "correct": False},
    ]
    s = summarize(rows)
    assert (s["accuracy"], s["accuracy_single"], s["accuracy_multi"], s["parse_rate"]) == (0.5, 0.5, 0.5, 0.75)
    assert pick_from_logprobs({"A": -1.0, "B": -3.0, "C": -2.0}, multi=False) == {"A"}
    assert pick_from_logprobs({"A": -1.0, "B": -1.1, "C": -6.0, "D": -7.0}, multi=True) == {"A", "B"}
    assert len(pick_from_logprobs({"A": -1.0, "B": -9.0, "C": -9.0}, multi=True)) == 2


def test_bad_data_is_one_line_error(tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q", "options": {"A": "a", "B": "b"}, "answer": ["C"]}\n')
    assert main(["eval", "--data", str(bad), "--format", "jsonl", "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "Traceback" not in err


def test_gguf_decodes_many_sequences_together_as_one_at_a_time():
    """batch_size > 1 decodes every sequence of a chunk in one llama_decode per step, with the same
    text, token for token, as one prompt at a time, and as llama-cpp-python's own create_completion for a
    first sample: greedy and sampled, prompts of different lengths, replies that end early (end of turn)
    and late (token limit); each prompt evaluated once."""
    import llama_cpp

    from medcritical.engines import LlamaCppEngine, _common_prefix, sample_seed

    eng = LlamaCppEngine(default_gguf(), n_ctx=1024, n_threads=1)
    prompts = [
        [{"role": "user", "content": "Reply with one word: is the sky blue?"}],
        [{"role": "user", "content": "Name one cause of chest pain, in a few words, and explain why it hurts."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2? Then count to 9."}],
    ]
    lengths = set()
    for temperature, n in ((0.0, 2), (1.0, 3)):
        kw = dict(max_new_tokens=20, temperature=temperature, top_p=0.9, n=n, seed=11)
        alone = eng.generate(prompts, batch_size=1, **kw)
        finished: list[int] = []
        together = eng.generate(prompts, batch_size=6, on_done=finished.append, **kw)
        assert together == alone
        assert sum(finished) == len(prompts)
        assert all(len(out) == n for out in together)
        lengths |= {len(eng.tokenize(t)) for out in together for t in out}
        for i, m in enumerate(prompts):  # the library's one-sequence generation, same seed: the same first sample
            eng.llm.reset()
            ref = eng.llm.create_completion(
                eng.tokenize(eng.render(m)), max_tokens=20, temperature=temperature, top_p=0.9, top_k=0, min_p=0.0,
                seed=sample_seed(sample_seed(11, i, 0), 0, 0), stop=[eng.eos],
            )  # fmt: skip
            assert ref["choices"][0]["text"].strip() == together[i][0]
    assert len(set(together[1])) > 1  # sampled: the samples of a prompt differ
    assert min(lengths) < 15 and max(lengths) >= 18  # some ended on their own, some ran to the limit
    # 6 sequences (2 prompts x 3 samples) per batch: the prompts' tokens are evaluated once each, then
    # at most 3 steps (4 tokens, the first sampled from the prompt's logits) of 6 tokens each.
    ctx = eng._streams[2]

    def decoded() -> int:
        perf = llama_cpp.llama_perf_context(ctx.ctx)
        return perf.n_p_eval + perf.n_eval

    # What both prompts start with (the chat template's head) is evaluated once, for both.
    before = decoded()
    eng.generate(prompts[:2], batch_size=6, max_new_tokens=4, temperature=1.0, n=3, seed=1)
    toks = [eng.tokenize(eng.render(m)) for m in prompts[:2]]
    shared = _common_prefix(toks)
    tokens = sum(map(len, toks)) - (shared if shared >= 16 else 0)
    assert tokens <= decoded() - before <= tokens + 3 * 6
    eng.close()


def test_gguf_layers_go_to_the_gpu_as_far_as_they_fit(monkeypatch) -> None:
    """A GPU build offloads every layer when the file fits the free memory, else the share that fits; a CPU
    build (this machine's) none. The free memory is what nvidia-smi would report."""
    import llama_cpp

    from medcritical.default_model import default_gguf
    from medcritical.gguf import file as gguf_file

    facts = gguf_file.check_gguf(default_gguf())
    layers = int(facts["metadata"]["llama.block_count"])
    assert gguf_file.gpu_layers(facts) == 0 and not llama_cpp.llama_supports_gpu_offload()
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    need, reserve = facts["data_bytes"], gguf_file.GPU_RESERVE
    for free, expected in [(need + reserve, -1), (None, -1), (reserve + need // 2, layers // 2), (reserve // 2, 0)]:
        monkeypatch.setattr(gguf_file, "_free_gpu_bytes", lambda f=free: f)
        assert gguf_file.gpu_layers(facts) == expected, free


def test_eval_without_a_model_runs_the_embedded_gguf_on_llamacpp(tmp_path: Path, capsys):
    """No model named: the embedded default's own GGUF on llama.cpp, batched, and the line says so."""
    out = tmp_path / "default"
    assert main(["eval", "--limit", "2", "--max-new-tokens", "8", "--output", str(out)]) == 0
    assert _summary(out)["engine"] == "llamacpp"
    said = " ".join(capsys.readouterr().out.split())  # the console may wrap the line
    assert "on llama.cpp (batched), at most 8 new tokens" in said
