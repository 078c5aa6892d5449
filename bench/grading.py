"""Benchmark: the answer grader against the regex grader it replaced (``git show 123a42e:medcritical/grading.py``).

    .venv/bin/python bench/grading.py                    # from the project root
    .venv/bin/python bench/grading.py --rev 123a42e --repeat 5

In one run:

1. Replies per second of both graders' ``extract_answer`` on the real model replies in
   ``tests/fixtures/replies/`` (rows whose source is not "synthetic"), best of ``--repeat``.
2. Accuracy of both on the whole labelled set there (real and hand-written replies).
3. Seconds per call on the degenerate reply small models emit, ``### Plan:\\n1. Define C, A, D,
   ...`` with n = 10, 14, 18 letters; the old grader backtracks exponentially on it (each run
   of the old one is capped by --cap seconds in a child process, so a hang reads "> cap").

Prints a table and writes ``bench/results/grading.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OLD_REV = "123a42e"  # the last commit with the backtracking regex grader
sys.path.insert(0, str(ROOT))

from medcritical import grading  # noqa: E402

console = Console(highlight=False, width=120)
FIXTURES = ROOT / "tests" / "fixtures" / "replies"


def old_grader(rev: str) -> ModuleType:
    """The grader as committed at ``rev``, imported from a temporary file (git is only read)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:medcritical/grading.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "grading_old.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("grading_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def degenerate(n: int) -> str:
    letters = ("CADBE" * 4)[:n]
    return "### Plan:\n1. Define " + ", ".join(letters) + ", ..."


def replies_per_second(fn, rows: list[dict], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for r in rows:
            fn(r["text"], r["letters"])
        best = min(best, time.perf_counter() - t0)
    return len(rows) / best


def accuracy(fn, rows: list[dict]) -> float:
    right = sum(fn(r["text"], r["letters"]) == (set(r["expected"]) if r["expected"] else None) for r in rows)
    return right / len(rows)


def _time_one(rev: str, text: str, queue: multiprocessing.Queue) -> None:
    fn = old_grader(rev).extract_answer if rev else grading.extract_answer
    fn("Answer: B")  # warm-up: first-call costs are not the grader's
    t0 = time.perf_counter()
    fn(text)
    queue.put(time.perf_counter() - t0)


def seconds_per_call(rev: str, text: str, cap: float) -> float | None:
    """Seconds of one call in a child process (the old grader can run for hours); None past ``cap``."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=_time_one, args=(rev, text, queue))
    child.start()
    child.join(cap + 5)  # import time on top of the call
    if child.is_alive():
        child.terminate()
        child.join()
        return None
    seconds = queue.get()
    return seconds if seconds <= cap else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rev", default=OLD_REV, help=f"git revision of the old grader (default {OLD_REV}: before the rewrite)"
    )
    p.add_argument("--repeat", type=int, default=3, help="timed passes over the replies; the best counts")
    p.add_argument("--cap", type=float, default=60.0, help="seconds before a degenerate-reply call is given up")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "grading.json"))
    args = p.parse_args(argv)

    old = old_grader(args.rev)
    rows = [json.loads(line) for path in sorted(FIXTURES.glob("*.jsonl")) for line in path.open(encoding="utf-8")]
    real = [r for r in rows if r["source"] != "synthetic"]
    results = {
        "replies": len(real),
        "labelled": len(rows),
        "old": {
            "replies_per_s": round(replies_per_second(old.extract_answer, real, args.repeat), 1),
            "accuracy": round(accuracy(old.extract_answer, rows), 4),
            "accuracy_real": round(accuracy(old.extract_answer, real), 4),
        },
        "new": {
            "replies_per_s": round(replies_per_second(grading.extract_answer, real, args.repeat), 1),
            "accuracy": round(accuracy(grading.extract_answer, rows), 4),
            "accuracy_real": round(accuracy(grading.extract_answer, real), 4),
        },
        "degenerate": [],
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
    }
    for n in (10, 14, 18):
        text = degenerate(n)
        results["degenerate"].append(
            {
                "letters": n,
                "chars": len(text),
                "old_s": seconds_per_call(args.rev, text, args.cap),
                "new_s": seconds_per_call("", text, args.cap),
            }
        )

    t = Table(title=f"extract_answer: {args.rev} vs working tree", title_justify="left")
    t.add_column("")
    t.add_column(f"old ({args.rev})", justify="right")
    t.add_column("new", justify="right")
    t.add_row(
        f"replies/s on {len(real)} real replies",
        f"{results['old']['replies_per_s']:,.0f}",
        f"{results['new']['replies_per_s']:,.0f}",
    )
    t.add_row(
        f"read right, {len(rows)} labelled replies",
        f"{results['old']['accuracy']:.1%}",
        f"{results['new']['accuracy']:.1%}",
    )
    t.add_row(
        f"read right, {len(real)} real replies",
        f"{results['old']['accuracy_real']:.1%}",
        f"{results['new']['accuracy_real']:.1%}",
    )

    def secs(v: float | None) -> str:
        return f"> {args.cap:g} s" if v is None else f"{v * 1000:,.2f} ms"

    for d in results["degenerate"]:
        t.add_row(f"'Define C, A, D, ...' n={d['letters']} letters", secs(d["old_s"]), secs(d["new_s"]))
    console.print(t)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
