"""`lmforge prepare` at scale: throughput and peak memory of the streaming encoder, N workers against one.

The corpus is synthetic English-like text made with a seed in a temporary folder: words drawn
with Zipf-like frequencies from a list of common English words, in sentences and paragraphs;
70 % of it as JSONL records of 1-20 kB (several files) and 30 % as three big .txt files (over
``data.BIG_TEXT_BYTES`` at the default size, so they are streamed in pieces). A small BPE
tokenizer is trained on a 2 MB sample. Then ``data.prepare`` runs twice, each in a fresh
subprocess: with ``--workers`` processes, and with ``workers=1`` (everything in one process).

Measured: the seconds of ``prepare`` itself (imports and start-up excluded), MB/s of input,
and peak memory of the whole process tree (the subprocess and its encoding workers), polled
from /proc every 0.1 s: the sum of PSS (each shared page counted once, split among the
processes that share it: the honest total for forked workers) and the sum of RSS (what
`top` would add up; it counts pages shared after fork once per process). Printed: a row per
run, the speed ratio, whether the two runs wrote identical shards, and whether the peak is
under 1 GB (the issue's bound for a 1 GB corpus).

    python benchmarks/prepare_speed.py                  # 1 GB corpus, one worker per CPU
    python benchmarks/prepare_speed.py --mb 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = """the of and to a in is it you that he was for on are with as I his they be at one have this from or
had by hot word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came show
every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father head stand own
page should country found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late run while press
close night real life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry took science eat room
friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true during hundred five remember
step early hold west ground interest reach fast verb sing listen six table travel less morning ten simple several
vowel toward war lay against pattern slow center love person money serve appear road map rain rule govern pull
cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
field rest correct able pound done beauty drive stood contain front teach week final gave green oh quick develop
ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing course
stay wheel full force blue object decide surface deep moon island foot system busy test record boat common gold
possible plane stead dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring
yes distant fill east paint language among""".split()


# --------------------------------------------------------------------------- the corpus
def _sentence_pool(rng: random.Random, n: int) -> list[str]:
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]  # Zipf: the k-th word 1/k as often as the first
    pool = []
    for _ in range(n):
        words = rng.choices(WORDS, weights, k=rng.randint(6, 24))
        text = " ".join(words)
        pool.append(text[0].upper() + text[1:] + rng.choice(".....?!") + " ")
    return pool


def _document(rng: random.Random, pool: list[str], chars: int) -> str:
    paragraphs, size = [], 0
    while size < chars:
        para = "".join(rng.choices(pool, k=rng.randint(3, 8))).rstrip()
        paragraphs.append(para)
        size += len(para) + 2
    return "\n\n".join(paragraphs)


def make_corpus(folder: Path, mb: int, seed: int = 0) -> list[Path]:
    """About ``mb`` MB of text in ``folder``: JSONL files (70 %) and three .txt files (30 %)."""
    rng = random.Random(seed)
    pool = _sentence_pool(rng, 50_000)
    total = mb * 1_000_000
    files = []
    jsonl_bytes, per_file = int(total * 0.7), 128_000_000
    for i in range(max(1, -(-jsonl_bytes // per_file))):
        path = folder / f"records_{i:02d}.jsonl"
        target = min(per_file, jsonl_bytes - i * per_file)
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < target:
                line = json.dumps({"id": rng.randrange(1 << 30),
                                   "text": _document(rng, pool, rng.randint(1_000, 20_000))}) + "\n"
                f.write(line)
                written += len(line)
        files.append(path)
    for i in range(3):
        path = folder / f"book_{i}.txt"
        target = (total - jsonl_bytes) // 3
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < target:
                chapter = _document(rng, pool, 200_000) + "\n\n"
                f.write(chapter)
                written += len(chapter)
        files.append(path)
    return files


# --------------------------------------------------------------------------- measuring
def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory_kb(pids: list[int]) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in kB over ``pids``."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            continue  # a process that just ended
    return pss, rss


RUN = """
import json, sys, time
from lmforge.config import DataConfig
from lmforge.data import prepare
from lmforge.tokenizer import Tokenizer
paths, out, tok, workers = json.loads(sys.argv[1])
tokenizer = Tokenizer.load(tok)
t0 = time.perf_counter()
shards = prepare(paths, out, tokenizer, DataConfig(workers=workers), force=True, quiet=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": shards.index["tokens"],
                  "sha256": shards.index["sha256"]}))
"""


def run_prepare(paths: list[Path], out: Path, tok: Path, workers: int) -> dict:
    """One prepare in a fresh subprocess, its process tree's memory polled while it runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = json.dumps([[str(p) for p in paths], str(out), str(tok), workers])
    proc = subprocess.Popen([sys.executable, "-c", RUN, args], stdout=subprocess.PIPE, env=env, text=True)
    peak_pss = peak_rss = peak_procs = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        pss, rss = _memory_kb(pids)
        peak_pss, peak_rss, peak_procs = max(peak_pss, pss), max(peak_rss, rss), max(peak_procs, len(pids))
        time.sleep(0.1)
    stdout = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"prepare with {workers} workers failed (exit code {proc.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    return res | {"workers": workers, "peak_pss_mb": peak_pss / 1024, "peak_rss_mb": peak_rss / 1024,
                  "processes": peak_procs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="corpus size in MB (default 1024)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers of the parallel run")
    ap.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary")
    ap.add_argument("--dir", help="work here (kept) instead of a temporary folder")
    args = ap.parse_args()

    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="prepare_speed_") as tmp:
        work = Path(args.dir or tmp)
        (work / "corpus").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        files = make_corpus(work / "corpus", args.mb)
        size = sum(f.stat().st_size for f in files)
        print(f"corpus: {size / 1e6:,.0f} MB in {len(files)} files ({time.perf_counter() - t0:.0f} s to write)")
        t0 = time.perf_counter()
        with open(files[0], encoding="utf-8") as f:
            sample = f.read(2_000_000)
        tok = Tokenizer.train([sample], TokenizerConfig(vocab_size=args.vocab))
        tok_path = tok.save(work / "tok.json")
        print(f"tokenizer: {tok.vocab_size} tokens, trained on a 2 MB sample ({time.perf_counter() - t0:.0f} s)")

        runs = [run_prepare(files, work / f"data_w{w}", tok_path, w) for w in (args.workers, 1)]
        print(f"\n{'workers':>7} {'seconds':>8} {'MB/s':>7} {'peak PSS MB':>12} {'peak RSS MB':>12} "
              f"{'processes':>9} {'tokens':>14}")
        for r in runs:
            tokens = r["tokens"]["train"] + r["tokens"]["val"]
            print(f"{r['workers']:>7} {r['seconds']:>8.1f} {size / 1e6 / r['seconds']:>7.2f} "
                  f"{r['peak_pss_mb']:>12,.0f} {r['peak_rss_mb']:>12,.0f} {r['processes']:>9} {tokens:>14,}")
        ratio = runs[1]["seconds"] / runs[0]["seconds"]
        print(f"\n{args.workers} workers / 1: {ratio:.2f}x the throughput")
        print(f"identical shards: {runs[0]['sha256'] == runs[1]['sha256']}")
        for r in runs:
            ok = r["peak_pss_mb"] < 1024
            print(f"peak memory with {r['workers']} worker(s) < 1 GB: {'yes' if ok else 'NO'} "
                  f"({r['peak_pss_mb']:,.0f} MB PSS for a {size / 1e6:,.0f} MB corpus)")


if __name__ == "__main__":
    main()
