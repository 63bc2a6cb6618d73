"""Memory, speed and resume at the model sizes RTX users run (random weights of real shapes).

`run SHAPE` measures one shape (a GGUF and a random compressor from bench/scale_shapes.py)
on the llama.cpp engine, every layer offloaded, flash attention as the engine sets it, in
one process, side by side:
- fit: peak GPU memory of the model plus one context of n_ctx tokens (off), for n_ctx from
  4k to the model's trained length: what `off` needs to hold a conversation that long;
- walks: one long conversation of MemoryBank exchanges, teacher-forced (add_turn), under off
  and under each level with its window, pure CCM and hybrid memory (window: the engine's K
  cache type; CCM and hybrid: the random compressor, f16). At exchanges 1/10/50/100/200/500
  the KV bytes held, and a short reply generated on the conversation itself (its time to
  first token and decode speed; that exchange stays in the conversation); after every
  exchange the policy's after-turn work is timed; the walk's peak GPU memory;
- resume: restore from the SQLite memory state vs rebuild from the transcript, at 8k / 32k /
  128k transcript tokens (bench/resume.py), off and balanced hybrid.
Peak GPU memory is NVML's device memory in use, sampled every 5 ms, less what was in use
before this process touched the GPU (nothing else runs there). Every section has its share
of `--seconds`; what did not fit is written down as not run. Writes JSON after each part.

`merge SHAPE_JSON PART_JSON...` folds later runs of some parts (`--parts walks`, ...) into a
shape's JSON: their walks replace the walks of the same config, their resume rows the rows of
the same level and length, and each run's command is kept under "runs".

`report FILE...` prints the README tables from the shapes' JSON, writes the card-by-card
guide (bench/results/scale_cards.json) and the plots.

    python bench/scale_inference.py run llama-3.1-8b --model /root/scale/llama-3.1-8b.gguf \
        --compressor /root/scale/llama-3.1-8b-ccm --seconds 170 --out $OUT/scale_llama-3.1-8b.json
    python bench/scale_inference.py report bench/results/scale_{llama,qwen}*.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ccm_chat.engine import ContextFullError, Engine, SamplingParams  # isort: skip  (llama_cpp first)
from ccm_chat.engine.config import LEVEL_BUDGETS, CompressionConfig  # isort: skip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from length import QUESTION, REPLY_TOKENS  # noqa: E402  (sibling script modules)
from machine import write_result  # noqa: E402
from plots import line_chart  # noqa: E402
from resume import DATA, exchanges, fill, first_token, fresh  # noqa: E402
from scale_shapes import SHAPES, Shape, tiny_shape  # noqa: E402
from turn_overhead import time_after_turn  # noqa: E402

CHECKPOINTS = (1, 10, 50, 100, 200, 500)
# Transcript tokens as bench/resume.py counts them; the template adds about 3 %, so 126,000 is
# the longest that fits Llama's 131,072-token context ("128k").
RESUME_LENGTHS = (8000, 32000, 126000)
COMPRESSED_CTX = 4096  # the app's default context size, which every level fits in
LEVELS = ("balanced", "aggressive", "light")  # walk order: the default level first
CARDS_GB = (8, 12, 16, 24)
CARD_RESERVE = 0.5 * 2**30  # what a desktop (display, driver) keeps of a card, assumed


# ---------------------------------------------------------------- GPU memory

class GpuMemory:
    """Device memory in use (NVML through ctypes: no package needed), sampled in a thread;
    `peak()` is the most seen since `reset()`, less the use before this process started.
    Without NVML (a CPU run) every reading is None."""

    class _Info(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                    ("used", ctypes.c_ulonglong)]

    def __init__(self, index: int = 0, interval: float = 0.005) -> None:
        self._lib = None
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            handle = ctypes.c_void_p()
            if lib.nvmlInit_v2() == 0 and lib.nvmlDeviceGetHandleByIndex_v2(
                    index, ctypes.byref(handle)) == 0:
                self._lib, self._handle = lib, handle
        except OSError:
            pass
        self.base = self.used()
        self._peak = 0
        self._stop = threading.Event()
        if self._lib is not None:
            threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def used(self) -> int | None:
        if self._lib is None:
            return None
        info = self._Info()
        self._lib.nvmlDeviceGetMemoryInfo(self._handle, ctypes.byref(info))
        return int(info.used)

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._peak = max(self._peak, self.used() or 0)

    def reset(self) -> None:
        self._peak = self.used() or 0

    def peak(self) -> int | None:
        if self._lib is None:
            return None
        self._peak = max(self._peak, self.used() or 0)
        return self._peak - self.base

    def now(self) -> int | None:
        used = self.used()
        return None if used is None else used - self.base


def process_memory() -> int | None:
    """This process's GPU memory as nvidia-smi lists it (a cross-check of NVML's device use)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(mib.strip()) * 2**20
    return None


# ---------------------------------------------------------------- parts

class Clock:
    """The shape's time, shared out by weight: a part's deadline is its weight's share of the
    time left when it starts, so what one part leaves unused passes on to the rest."""

    def __init__(self, seconds: float, weights: dict[str, float]) -> None:
        self.end = time.perf_counter() + seconds
        self.weights = dict(weights)

    def left(self) -> float:
        return self.end - time.perf_counter()

    def deadline(self, part: str) -> float:
        """When `part` must stop: its weight over the weights of the parts still to come."""
        weight = self.weights.pop(part)
        share = weight / (weight + sum(self.weights.values()))
        return time.perf_counter() + max(0.0, self.left()) * share


# Parts of a shape's time, by weight: off's walk runs longest (its memory grows), the
# default level comes next, light (whose after-turn work is the largest) last.
WEIGHTS = {"off": 3.0, "resume off": 3.0, "balanced: hybrid": 2.0, "balanced: ccm": 1.5,
           "resume balanced: hybrid": 3.0, "balanced: window": 1.0,
           **{f"aggressive: {kind}": 1.0 for kind in ("hybrid", "ccm", "window")},
           **{f"light: {kind}": 0.7 for kind in ("hybrid", "ccm", "window")}}


def fit(model_path: Path, shape: Shape, device: str, gpu: GpuMemory,
        sizes: list[int]) -> list[dict]:
    """Peak GPU memory of the model with one context of n_ctx tokens as `off` makes it
    (f16 KV, flash attention on), after a 512-token prefill and a few decodes: llama.cpp
    allocates the whole KV cache and the compute buffers when the context is made."""
    from ccm_chat.engine.llama_backend import LlamaContext, LlamaModel

    rows = []
    gpu.reset()
    model = LlamaModel(model_path, n_gpu_layers=-1 if device == "gpu" else 0)
    weights = gpu.peak()
    prompt = list(range(1000, 1512))
    for n_ctx in sizes:
        if model.n_ctx_train and n_ctx > model.n_ctx_train:
            continue
        gpu.reset()
        start = time.perf_counter()
        try:
            ctx = LlamaContext(model, n_ctx=n_ctx)
        except Exception as exc:  # noqa: BLE001  (out of memory is the answer here)
            rows.append({"n_ctx": n_ctx, "error": str(exc)})
            continue
        for i in range(0, len(prompt), ctx.n_batch):
            ctx.decode(prompt[i:i + ctx.n_batch], i)
        for j in range(8):
            ctx.decode([2000 + j], len(prompt) + j)
        rows.append({"n_ctx": n_ctx, "peak_bytes": gpu.peak(), "process_bytes":
                     process_memory(), "kv_f16_bytes": n_ctx * shape.kv_bytes_per_token,
                     "seconds": round(time.perf_counter() - start, 2)})
        ctx.close()
        print(f"fit n_ctx {n_ctx}: peak {fmt_gb(rows[-1]['peak_bytes'])}", flush=True)
    model.close()
    return [{"weights_loaded_bytes": weights}, *rows]


def configs(engine: Engine, level: str) -> dict[str, CompressionConfig]:
    """The level's pure CCM and hybrid memory on an engine that has the compressor."""
    budget = LEVEL_BUDGETS[level][0]
    files = engine.ccm.files
    pure = CompressionConfig(level, "ccm-concat", {"n_comp": files.n_comp, "cap":
                             budget // files.n_comp, "compressor": files.fingerprint}, "f16",
                             "pure CCM")
    return {"hybrid": engine.compression_for(level), "ccm": pure}


def probe(conv) -> dict:
    """A short greedy reply on the conversation itself: time to first token, decode speed."""
    start = time.perf_counter()
    pieces = conv.send(QUESTION, SamplingParams(temperature=0.0, max_tokens=REPLY_TOKENS))
    next(pieces, None)
    ttft = time.perf_counter() - start
    for _ in pieces:
        pass
    reply = conv.last_reply
    return {"ttft_s": ttft, "decode_tok_s": reply.tokens_per_second, "reply_tokens":
            reply.tokens}


def walk(engine: Engine, compression: CompressionConfig, pairs: list[tuple[str, str]],
         deadline: float, gpu: GpuMemory, label: str) -> dict:
    conv = engine.new_conversation(compression=compression)
    policy_s = time_after_turn(conv)
    gpu.reset()
    points, exchange_s, stopped = [], [], "done"
    started = time.perf_counter()
    for t, (user, assistant) in enumerate(pairs, 1):
        if time.perf_counter() > deadline:
            stopped = f"time: its share ran out after {t - 1} exchanges"
            break
        start = time.perf_counter()
        try:
            conv.add_turn("user", user)
            conv.add_turn("assistant", assistant)
        except ContextFullError as exc:
            stopped = f"context full at exchange {t}: {exc}"
            break
        exchange_s.append(time.perf_counter() - start)
        if t in CHECKPOINTS:
            stats = conv.stats()
            row = {"exchange": t, "held": stats.memory_tokens, "kv_bytes": stats.memory_bytes,
                   "full_tokens": stats.full_context_tokens,
                   "full_f16_bytes": stats.full_context_bytes}
            try:
                row.update(probe(conv))
            except ContextFullError as exc:
                row["probe"] = f"no room: {exc}"
            points.append(row)
            print(f"{label:>20} exchange {t:>3}: held {row['held']:>6} "
                  f"({row['kv_bytes'] / 1e6:8.1f} MB)  ttft {row.get('ttft_s', 0):.3f} s  "
                  f"decode {row.get('decode_tok_s', 0):6.1f} tok/s", flush=True)
    engine.release(conv)
    work = [1000 * s for s in policy_s]
    return {"config": label, "level": compression.level, "method": compression.method,
            "params": compression.params, "kv_type": engine.kv_type, "n_ctx": engine.n_ctx,
            "exchanges": len(exchange_s), "stopped": stopped,
            "seconds": round(time.perf_counter() - started, 1),
            "peak_bytes": gpu.peak(), "process_bytes": process_memory(),
            "exchange_ms_median": 1000 * statistics.median(exchange_s) if exchange_s else None,
            "after_turn_ms_median": statistics.median(work) if work else None,
            "after_turn_ms_p90": sorted(work)[int(0.9 * (len(work) - 1))] if work else None,
            "after_turn_ms_max": max(work) if work else None,
            "points": points}


def resume_rows(engine: Engine, level: str, lengths: tuple[int, ...], deadline: float,
                pairs: list[tuple[str, str]], label: str) -> list[dict]:
    """bench/resume.py's measurement, one row a length; a rebuild still running at the
    deadline is cancelled and says how far it got."""
    from ccm_chat.app.settings import Settings
    from ccm_chat.storage import Store

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="ccm-scale-resume-"))
    settings = Settings(compression=level, context_size=engine.n_ctx)
    for length in lengths:
        row = {"level": label, "transcript_tokens": length}
        rows.append(row)
        if time.perf_counter() > deadline:
            row["note"] = "not run: the time share ran out"
            continue
        if level == "off" and length > engine.n_ctx - 64:
            row["note"] = f"does not fit the model's {engine.n_ctx}-token context"
            continue
        store = Store(tmp / f"{level}-{length}.db")
        conv_id = fill(store, engine, length, pairs)
        cancel = threading.Event()
        timer = threading.Timer(max(0.0, deadline - time.perf_counter()), cancel.set)
        timer.start()
        service = fresh(store, settings, engine)
        try:
            row["rebuild_first_token_s"], kind, _ = first_token(service, conv_id, cancel)
            row["rebuilt_as"] = kind
            row["rebuild_reason"] = service._reports[conv_id].reason
        except Exception as exc:  # noqa: BLE001  (a cancelled or failed rebuild is the row)
            row["note"] = f"rebuild not finished: {type(exc).__name__}: {exc}"[:300]
            store.close()
            timer.cancel()
            continue
        timer.cancel()
        if service.memory_error:  # the store refused the state: time the engine's restore
            row["note"] = f"no restore from the store: {service.memory_error}"[:300]
            live = service._live[conv_id]
            start = time.perf_counter()
            blob = live.save_state()
            saved = time.perf_counter() - start
            engine.release(live)
            start = time.perf_counter()
            copy = engine.restore_conversation(blob)
            pieces = copy.send(QUESTION, SamplingParams(temperature=0.0, max_tokens=1))
            next(pieces, None)
            row.update(engine_restore_first_token_s=time.perf_counter() - start,
                       engine_save_s=saved, state_bytes=len(blob))
            pieces.close()
            engine.release(copy)
            del blob
        else:
            again = fresh(store, settings, engine)
            seconds, kind, opened = first_token(again, conv_id)
            state = store.latest_memory_state(conv_id)
            row.update(restore_first_token_s=seconds, restored_as=kind, restore_open_s=opened,
                       restore_reason=again._reports[conv_id].reason,
                       state_bytes=state.size, tokens_held=state.tokens_held,
                       tokens_seen=state.tokens_seen)
        engine.release(service._live[conv_id])
        store.close()
        print(f"resume {label} {length}: {row}", flush=True)
    return rows


def run(args: argparse.Namespace) -> dict:
    shape = tiny_shape(args.shape[5:]) if args.shape.startswith("tiny-") else SHAPES[args.shape]
    gpu = GpuMemory()
    clock = Clock(args.seconds, WEIGHTS)
    pairs = exchanges(args.data)
    result: dict = {"shape": shape.name, "shape_table": shape.__dict__,
                    "device": args.device, "model_bytes": args.model.stat().st_size,
                    "note": "random weights: speed and memory only", "gpu_base_bytes": gpu.base,
                    "walks": [], "resume": []}

    def save() -> None:
        write_result(args.out, args.device, result, quiet=True)

    parts = set(args.parts.split(","))
    if "walks" not in parts:  # the time goes to what runs
        clock.weights = {k: v for k, v in clock.weights.items() if k.startswith("resume")}
    if "resume" not in parts:
        clock.weights = {k: v for k, v in clock.weights.items() if not k.startswith("resume")}
    sizes = [s for s in (4096, 16384, 32768, 65536, 131072) if s <= shape.context]
    result["fit"] = fit(args.model, shape, args.device, gpu, sizes) if "fit" in parts else []
    save()
    off_ctx = min(args.off_ctx, shape.context)
    for level in ("off", *LEVELS):
        for with_ccm in ((False,) if level == "off" else (True, False)):
            resume_tag = "resume " + ("off" if level == "off" else f"{level}: hybrid")
            resumes = with_ccm or level == "off"
            if "walks" not in parts and not (resumes and resume_tag in clock.weights):
                continue
            gpu.reset()
            start = time.perf_counter()
            engine = Engine.load(args.model, compression=level, device=args.device,
                                 n_ctx=off_ctx if level == "off" else COMPRESSED_CTX,
                                 compressor=args.compressor if with_ccm else False)
            load_s = round(time.perf_counter() - start, 2)
            walks = ({"off": engine.compression} if level == "off" else
                     configs(engine, level) if with_ccm else {"window": engine.compression})
            for name, compression in walks.items() if "walks" in parts else ():
                tag = "off" if level == "off" else f"{level}: {name}"
                row = walk(engine, compression, pairs[:max(CHECKPOINTS)], clock.deadline(tag),
                           gpu, tag)
                result["walks"].append({**row, "load_s": load_s})
                save()
            if resumes and resume_tag in clock.weights:
                result["resume"] += resume_rows(engine, level, RESUME_LENGTHS,
                                                clock.deadline(resume_tag), pairs,
                                                resume_tag.removeprefix("resume "))
                save()
            engine.close()
    result["seconds_left"] = round(clock.left(), 1)
    save()
    return result


# ---------------------------------------------------------------- report

def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def cards(result: dict, per_exchange: float | None = None) -> dict:
    """For each card, the longest conversation the shape holds: off from the measured peaks
    of its fit contexts (a least-squares line through them: the KV cache and llama.cpp's
    buffers grow linearly with n_ctx; capped at the model's trained length), the levels from
    the largest measured peak of their walks (flat: the memory never grows past the level's
    budget, so once the 4,096-token context fits, a chat of any length does), or, without
    walks, from off's measured 4,096-token context (the same f16 cache; on the shapes with
    walks the levels' peaks were within 0.2 GiB of it). `per_exchange`: tokens an exchange
    takes, when the shape has no off walk to say."""
    fit_rows = [r for r in result["fit"] if r.get("peak_bytes")]
    if not fit_rows:
        return {"shape": result["shape"], "cards": {}, "note": "no GPU memory measured"}
    xs = [r["n_ctx"] for r in fit_rows]
    ys = [r["peak_bytes"] for r in fit_rows]
    slope, base = statistics.linear_regression(xs, ys) if len(xs) > 1 else (0.0, 0.0)
    walks = [w for w in result["walks"] if w["config"] != "off"]
    off = next((w for w in result["walks"] if w["config"] == "off"), {})
    points = [p for p in off.get("points", []) if p.get("full_tokens")]
    if points:
        per_exchange = points[-1]["full_tokens"] / points[-1]["exchange"]
    measured = [w["peak_bytes"] for w in walks if w.get("peak_bytes")]
    levels_peak = max(measured) if measured else next(
        (r["peak_bytes"] for r in fit_rows if r["n_ctx"] == COMPRESSED_CTX), None)
    out = {"shape": result["shape"], "off_peak_bytes_per_token": slope,
           "off_peak_bytes_at_zero": base, "tokens_per_exchange": per_exchange,
           "levels_peak_bytes": levels_peak,
           "levels_peak_from": "walks" if measured else f"off at n_ctx {COMPRESSED_CTX}",
           "card_reserve_bytes": CARD_RESERVE, "cards": {}}
    for gb in CARDS_GB:
        room = gb * 2**30 - CARD_RESERVE
        tokens = max(0, min(int((room - base) / slope), max(xs))) if slope else 0
        out["cards"][gb] = {
            "off_tokens": tokens,
            "off_exchanges": int(tokens / per_exchange) if per_exchange else None,
            "off_capped_by_model": tokens >= max(xs),
            "levels_fit": levels_peak is not None and levels_peak <= room}
    return out


def report(paths: list[Path], out_dir: Path) -> None:
    results = [json.loads(p.read_text()) for p in paths]
    print("| shape | n_ctx | peak GPU GB (measured) | f16 KV GB |")
    print("|---|---|---|---|")
    for r in results:
        for f in r["fit"]:
            if "n_ctx" in f:
                print(f"| {r['shape']} | {f['n_ctx']:,} | {fmt_gb(f.get('peak_bytes'))} | "
                      f"{fmt_gb(f['kv_f16_bytes'])} |")
    print("\n| shape | config | exchange | held | KV MB | TTFT s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for w in r["walks"]:
            for p in w["points"]:
                print(f"| {r['shape']} | {w['config']} | {p['exchange']} | {p['held']:,} | "
                      f"{p['kv_bytes'] / 1e6:,.1f} | {p.get('ttft_s', float('nan')):.3f} | "
                      f"{p.get('decode_tok_s', float('nan')):.1f} |")
    print("\n| shape | config | peak GPU GB | after-turn ms (median / p90 / max) | exchange ms "
          "| exchanges | stopped |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for w in r["walks"]:
            work = (f"{w['after_turn_ms_median']:.1f} / {w['after_turn_ms_p90']:.1f} / "
                    f"{w['after_turn_ms_max']:.1f}" if w["after_turn_ms_median"] is not None
                    else "-")
            print(f"| {r['shape']} | {w['config']} | {fmt_gb(w['peak_bytes'])} | {work} | "
                  f"{_num(w['exchange_ms_median'], '.1f')} | {w['exchanges']} | {w['stopped']} |")
    print("\n| shape | level | transcript tokens | rebuild -> 1st token s | restore -> 1st "
          "token s (made as) | engine restore s | state MB | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["resume"]:
            state = row.get("state_bytes")
            print(f"| {r['shape']} | {row['level']} | {row['transcript_tokens']:,} | "
                  f"{_num(row.get('rebuild_first_token_s'), '.2f')} | "
                  f"{_num(row.get('restore_first_token_s'), '.3f')} "
                  f"({row.get('restored_as', '-')}) | "
                  f"{_num(row.get('engine_restore_first_token_s'), '.2f')} | "
                  f"{_num(state and state / 1e6, ',.1f')} | "
                  f"{row.get('note', '') or row.get('restore_reason', '')} |")
    known: dict[str, list[float]] = {}  # tokens an exchange, by architecture (template)
    for r in results:
        if (c := cards(r)).get("tokens_per_exchange"):
            known.setdefault(r["shape_table"]["arch"], []).append(c["tokens_per_exchange"])
    guide = [cards(r, statistics.fmean(known.get(r["shape_table"]["arch"], [0.0])) or None)
             for r in results]
    write_result(out_dir / "scale_cards.json", "cpu", {"cards": guide})
    print("\n| model | " + " | ".join(f"{gb} GB card" for gb in CARDS_GB) + " |")
    print("|---|" + "---|" * len(CARDS_GB))
    for g in guide:
        cells = []
        for gb in CARDS_GB:
            row = g["cards"].get(gb)
            if row is None:
                cells.append("-")
                continue
            off = (f"{row['off_tokens'] // 1000}k tokens (~{row['off_exchanges']:,} exch.)"
                   + (", the model's limit" if row["off_capped_by_model"] else "")
                   if row["off_tokens"] >= COMPRESSED_CTX else "does not fit")
            levels = "any length" if row["levels_fit"] else "does not fit"
            cells.append(f"off: {off}; every level: {levels}")
        print(f"| {g['shape']} | " + " | ".join(cells) + " |")
    for path in plot(results, out_dir):
        print("plot:", path)


def plot(results: list[dict], out_dir: Path) -> list[Path]:
    style = {"off": "-", "balanced: hybrid": "o-", "balanced: ccm": "s--",
             "balanced: window": "x:"}
    memory, speed, peak = {}, {}, {}
    for r in results:
        for w in r["walks"]:
            if w["config"] not in style or not w["points"]:
                continue
            x = [p["exchange"] for p in w["points"]]
            label = f"{r['shape']} {w['config']}"
            memory[label] = (x, [p["kv_bytes"] / 1e6 for p in w["points"]], style[w["config"]])
            speed[label] = (x, [p.get("decode_tok_s") for p in w["points"]], style[w["config"]])
        fit_rows = [f for f in r["fit"] if f.get("peak_bytes")]
        peak[r["shape"]] = ([f["n_ctx"] for f in fit_rows],
                            [f["peak_bytes"] / 2**30 for f in fit_rows], "o-")
    top = max((max(v[0]) for v in peak.values() if v[0]), default=131072)
    for gb in CARDS_GB:
        peak[f"{gb} GB card"] = ([4096, top], [gb, gb], "k:")
    return [
        line_chart(out_dir / "scale_memory.png", memory, "exchanges (log)",
                   "KV memory held, MB (log)", "KV held vs conversation length (random "
                   "weights, H200)", logx=True, logy=True),
        line_chart(out_dir / "scale_speed.png", speed, "exchanges (log)", "decode tokens/s",
                   "Decode speed vs conversation length (random weights, H200)", logx=True),
        line_chart(out_dir / "scale_fit.png", peak, "context tokens, off (log)",
                   "peak GPU memory, GiB", "Peak GPU memory of off vs context size (H200)",
                   logx=True),
    ]


def merge(base: Path, parts: list[Path]) -> None:
    result = json.loads(base.read_text())
    result.setdefault("runs", [{"command": result["command"], "machine": result["machine"]}])
    for path in parts:
        part = json.loads(path.read_text())
        if part["shape"] != result["shape"]:
            raise SystemExit(f"{path} measured {part['shape']}, not {result['shape']}")
        new = {w["config"] for w in part["walks"]}
        result["walks"] = [w for w in result["walks"] if w["config"] not in new] + part["walks"]
        rows = {(r["level"], r["transcript_tokens"]) for r in part["resume"]
                if "not run" not in r.get("note", "")}
        result["resume"] = [r for r in result["resume"]
                            if (r["level"], r["transcript_tokens"]) not in rows]
        result["resume"] += [r for r in part["resume"]
                             if (r["level"], r["transcript_tokens"]) in rows]
        if part.get("fit"):
            result["fit"] = part["fit"]
        measured = [name for name in ("walks", "resume") if part[name]]
        result["runs"].append({"command": part["command"], "machine": part["machine"],
                               "parts": measured})
    write_result(base, "cpu", result, quiet=True)  # the base run's machine, commit stay
    print(f"merged {len(parts)} run(s) into {base}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure one shape")
    r.add_argument("shape", choices=[*SHAPES, "tiny-llama", "tiny-qwen2"])
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--compressor", type=Path, required=True)
    r.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    r.add_argument("--seconds", type=float, default=170.0, help="the shape's time in all")
    r.add_argument("--off-ctx", type=int, default=131072)
    r.add_argument("--parts", default="fit,walks,resume", help="which parts to run")
    r.add_argument("--data", type=Path, default=DATA, help="the MemoryBank folder")
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report", help="tables, card guide and plots from the shapes' JSON")
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    m = sub.add_parser("merge", help="fold later runs of some parts into a shape's JSON")
    m.add_argument("base", type=Path)
    m.add_argument("parts", type=Path, nargs="+")
    args = parser.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "merge":
        merge(args.base, args.parts)
    else:
        report(args.paths, args.out_dir)


if __name__ == "__main__":
    main()
