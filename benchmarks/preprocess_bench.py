"""Side-by-side benchmark: this tool vs Megatron-LM's tools/preprocess_data.py vs SentencePiece.

    python benchmarks/preprocess_bench.py --corpus /work/bench-data/docs50.jsonl /work/bench-data/docs200.jsonl \
        --model /work/bench-data/bpe32k_llama.model /work/bench-data/bpe32k.model --workers 2 --reps 3 \
        --verify 2000 --megatron-lm /tmp/megatron-lm --megatron-python /tmp/mlm-venv/bin/python

Per corpus, repetition and tokenizer model, in interleaved order (ours, Megatron-LM, SentencePiece,
ours, ...):
  * ours:       python -m megatron_plugin.preprocess --input C --output-prefix P --tokenizer-model M
                --append-eod --workers W --no-progress --overwrite
  * megatron:   python tools/preprocess_data.py --input C --output-prefix P --tokenizer-type
                GPTSentencePieceTokenizer --tokenizer-model M --append-eod --workers W
                (only when --megatron-lm points at a Megatron-LM checkout; skipped otherwise)
  * sp-batched: SentencePiece's own ``encode(docs, num_threads=W)`` on the same documents, already
                in memory (its wall time counts only the encode call: the raw tokenizer speed)
Wall time is measured around each command; peak memory is the largest sum of RSS over the
process tree, sampled every 20 ms. Ours and Megatron-LM's outputs are compared byte for byte.
With ``--verify N`` each corpus and model gets one more run of ours, untimed, that re-encodes N
documents with plain SentencePiece and fails on any difference. Reports medians and ratios, the
encoder path the manifest names, and the load average; ``--json`` writes every measurement.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

SP_SCRIPT = r"""
import json, sys, time, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[2])
with open(sys.argv[1], encoding="utf-8") as f:
    docs = [json.loads(l)["text"] for l in f]
t = time.perf_counter()
ids = sp.encode(docs, num_threads=int(sys.argv[3]))
print(json.dumps({"encode_s": time.perf_counter() - t, "tokens": sum(map(len, ids)) + sum(1 for i in ids if i)}))
"""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], env: dict, cwd: str | None = None) -> dict:
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _tree_rss(ps))
        time.sleep(0.02)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 2**20, "stdout": out[-2000:],
            "stderr": err[-500:], "load1": os.getloadavg()[0]}


def run_corpus(corpus: str, model: str, tag: str, args, env: dict, mlm_env, out_dir: Path, rep: int, res: dict) -> None:
    W = str(args.workers)
    ours_prefix = out_dir / f"ours-{tag}"
    mlm_prefix = out_dir / f"mlm-{tag}"
    r = measure([sys.executable, "-m", "megatron_plugin.preprocess", "--input", corpus,
                 "--output-prefix", str(ours_prefix), "--tokenizer-model", model, "--append-eod",
                 "--workers", W, "--no-progress", "--overwrite"], env)
    res["ours"].append(r)
    print(f"[{tag} rep {rep}] ours       {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
          f"{r['peak_rss_mb']:7.0f} MB  load {r['load1']:.1f}", flush=True)
    if mlm_env is not None:
        r = measure([args.megatron_python, "tools/preprocess_data.py", "--input", corpus,
                     "--output-prefix", str(mlm_prefix), "--tokenizer-type", "GPTSentencePieceTokenizer",
                     "--tokenizer-model", model, "--append-eod", "--workers", W],
                    mlm_env, cwd=args.megatron_lm)
        res["megatron"].append(r)
        print(f"[{tag} rep {rep}] megatron   {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
              f"{r['peak_rss_mb']:7.0f} MB  load {r['load1']:.1f}", flush=True)
        a, b = f"{ours_prefix}_text_document", f"{mlm_prefix}_text_document"
        same = all(filecmp.cmp(a + e, b + e, shallow=False) for e in (".bin", ".idx"))
        res["identical"] = same if res["identical"] is None else (res["identical"] and same)
    sp_script = out_dir / "sp_batched.py"
    r = measure([sys.executable, str(sp_script), corpus, model, W], env)
    enc = json.loads(r["stdout"].strip().splitlines()[-1])
    res["sp_batched"].append(r)
    res["sp_encode_s"].append(enc["encode_s"])
    print(f"[{tag} rep {rep}] sp-batched {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
          f"(encode call {enc['encode_s']:.2f} s)  {r['peak_rss_mb']:7.0f} MB  load {r['load1']:.1f}", flush=True)
    m = json.loads(Path(f"{ours_prefix}_text_document.json").read_text())
    res["tokens"] = m["tokens"]
    res["documents"] = m["documents"]["written"]
    res["cache_hit_rate"] = m["encoder"]["cache_hit_rate"]
    res["encoder"] = m["encoder"]["mode"]


def verify_corpus(corpus: str, model: str, tag: str, n: int, env: dict, out_dir: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "megatron_plugin.preprocess", "--input", corpus, "--output-prefix",
           str(out_dir / f"verify-{tag}"), "--tokenizer-model", model, "--append-eod", "--workers", str(workers),
           "--no-progress", "--overwrite", "--verify", str(n)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"passed": False, "error": proc.stderr[-1000:]}
    m = json.loads(Path(f"{out_dir / f'verify-{tag}'}_text_document.json").read_text())
    return {"passed": True, "verified_documents": m["encoder"]["verified_documents"], "mode": m["encoder"]["mode"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", nargs="+", required=True)
    ap.add_argument("--model", nargs="+", required=True, help="one or more SentencePiece models (one table each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--verify", type=int, default=0, metavar="N",
                    help="one more untimed run per corpus and model with --verify N")
    ap.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout (tools/preprocess_data.py)")
    ap.add_argument("--megatron-python", default=sys.executable)
    ap.add_argument("--megatron-pythonpath", default="", help="extra PYTHONPATH entries (e.g. a 3.11 shim)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="ppbench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    mlm_env = None
    if args.megatron_lm and (Path(args.megatron_lm) / "tools" / "preprocess_data.py").exists():
        pp = [p for p in (args.megatron_pythonpath, args.megatron_lm) if p]
        mlm_env = dict(os.environ, PYTHONPATH=os.pathsep.join(pp))
    (out_dir / "sp_batched.py").write_text(SP_SCRIPT)
    results: dict = {}
    for corpus in args.corpus:
        runs = {}
        for model in args.model:
            tag = f"{Path(corpus).stem}-{Path(model).stem}"
            runs[model] = (tag, {"ours": [], "megatron": [], "sp_batched": [], "sp_encode_s": [], "identical": None,
                                 "bytes": os.path.getsize(corpus), "corpus": Path(corpus).stem,
                                 "model": Path(model).stem})
        for rep in range(args.reps):
            for model, (tag, res) in runs.items():
                run_corpus(corpus, model, tag, args, env, mlm_env, out_dir, rep, res)
        for model, (tag, res) in runs.items():
            if args.verify:
                res["verify"] = verify_corpus(corpus, model, tag, args.verify, env, out_dir, args.workers)
                print(f"[{tag}] verify {args.verify}: {res['verify']}", flush=True)
            results[tag] = res
    report(results, args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(results: dict, workers: int) -> None:
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    print()
    print("| corpus | model | encoder | MB | docs | tokens | ours s | Megatron-LM s | SP encode s | vs Megatron-LM "
          "| vs SP encode | ours peak RSS MB | Megatron-LM peak RSS MB | identical | verify |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results.values():
        ours = med([r["wall_s"] for r in res["ours"]])
        mlm = med([r["wall_s"] for r in res["megatron"]])
        spe = med(res["sp_encode_s"])
        v = res.get("verify")
        vtxt = "-" if v is None else (f"{v['verified_documents']} ok" if v["passed"] else "FAILED")
        print(f"| {res['corpus']} | {res['model']} | {res['encoder']} | {res['bytes'] / 1e6:.1f} | {res['documents']:,} "
              f"| {res['tokens']:,} | {ours:.2f} | {mlm:.2f} | {spe:.2f} | {mlm / ours:.2f}x | {spe / ours:.2f}x | "
              f"{max(r['peak_rss_mb'] for r in res['ours']):.0f} | "
              f"{max((r['peak_rss_mb'] for r in res['megatron']), default=float('nan')):.0f} | {res['identical']} "
              f"| {vtxt} |")
    for tag, res in results.items():
        ours = med([r["wall_s"] for r in res["ours"]])
        ocpu = med([r["cpu_s"] for r in res["ours"]])
        mcpu = med([r["cpu_s"] for r in res["megatron"]])
        scpu = med([r["cpu_s"] for r in res["sp_batched"]])
        ratios_m = [m["wall_s"] / o["wall_s"] for o, m in zip(res["ours"], res["megatron"])]
        ratios_s = [e / o["wall_s"] for o, e in zip(res["ours"], res["sp_encode_s"])]
        loads = [r["load1"] for k in ("ours", "megatron", "sp_batched") for r in res[k]]
        print(f"{tag}: per-rep wall ratios vs Megatron-LM {[round(x, 2) for x in ratios_m]}, "
              f"vs SP encode {[round(x, 2) for x in ratios_s]}; CPU seconds (median) ours {ocpu:.2f}, "
              f"Megatron-LM {mcpu:.2f}, SP batched process {scpu:.2f}; ours {res['tokens'] / ours / workers:,.0f} "
              f"tokens/s per worker, cache hit rate {res['cache_hit_rate']}; load average {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
