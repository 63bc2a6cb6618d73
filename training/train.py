"""Training the compressor: whole dialogues in one masked forward, every reply scored.

Only the <COMP> table and the LoRA learn; the base model stays frozen. Each step takes one
dialogue and a window w (sampled per dialogue, so one compressor serves every level): the
reply of exchange j reads the slots of the exchanges before j - w and the text of j - w..j
verbatim (w = 0: pure CCM), as the app's hybrid memory does. The loss on each reply is its
NLL plus a KL term to the frozen model reading the whole history (one no-grad forward,
adapter off): "answer as if you had read it all".

Checkpoints hold everything a run needs to go on exactly where it stopped: the trainable
tensors, AdamW's moments, the schedule, the step, the RNG states; the data is a function of
(seed, step), so the step is the data position. They are tensors (safetensors) and JSON only:
a run folder may come from elsewhere, and a pickle in it would run code on resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ccm_chat.engine.ccm.compressor import Compressor
from ccm_chat.engine.ccm.layout import Block, block_layout
from ccm_chat.training import parallel
from ccm_chat.training.data import Dialogue
from ccm_chat.training.state_json import join_state, split_state

CHECKPOINT = "checkpoint.safetensors"
STATE = "checkpoint.json"
OPTIMIZER = "checkpoint_optimizer.safetensors"  # AdamW's moments, the RNG states' tensors
OPTIMIZER_STATE = "checkpoint_optimizer.json"  # the rest of the optimizer, schedule and RNGs
LEGACY_OPTIMIZER = "checkpoint_optimizer.pt"  # what runs wrote before: a torch pickle
LOG = "train_log.jsonl"
LOGIT_CHUNK = 1 << 26  # float32 logits held at once in the loss: 256 MB
# what a resumed run may set otherwise than the checkpoint's config (when it writes, not what)
RESUMABLE_CHANGES = ("checkpoint_every", "eval_every")


@dataclass(frozen=True)
class TrainConfig:
    """How a compressor trains; the defaults are what `ccm-chat train-compressor` runs."""

    steps: int = 500
    lr: float = 3e-4
    warmup: int = 30  # steps of linear warm-up, then cosine down to lr * min_lr
    min_lr: float = 0.1
    clip: float = 1.0  # gradient norm clip
    nll_weight: float = 1.0
    kl_weight: float = 1.0  # KL(full-context frozen model || memory-conditioned model)
    every_reply: bool = True  # False: only the last exchange's reply is scored
    max_window: int = 8  # w ~ uniform 0..max_window per dialogue
    reads: int = 12  # hybrid read blocks per dialogue (w > 0), on random replies
    pure_replies: bool = True  # with w > 0, still score the pure-CCM reads (free)
    min_exchanges: int = 4
    max_exchanges: int = 256  # log-uniform length, capped by max_tokens
    max_tokens: int = 8192  # the teacher reads it all: at most the model's context
    recall_share: float = 0.5
    max_distance: int = 200

    def for_cpu(self) -> TrainConfig:
        """Without CUDA: short dialogues and few hybrid reads (a dense-masked forward over
        thousands of positions takes minutes a step on a small CPU)."""
        return replace(self, max_exchanges=min(self.max_exchanges, 6),
                       max_tokens=min(self.max_tokens, 512), reads=min(self.reads, 2),
                       max_window=min(self.max_window, 2))
    checkpoint_every: int = 100
    eval_every: int = 200
    seed: int = 0
    batch: int = 1  # dialogues a step, over all processes (a multiple of their number)


def schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        done = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1, done)))
    return factor


@dataclass(frozen=True)
class Plan:
    """What one step scores in a dialogue: window w and the replies read each way."""

    window: int
    pure: list[int]  # replies read in their compression block (pure CCM view)
    hybrid: list[int]  # replies read through a hybrid read block


def plan_for(dialogue: Dialogue, config: TrainConfig, rng: random.Random,
             window: int | None = None) -> Plan:
    """The step's window (sampled unless given) and which replies it scores how: every
    reply in its pure-CCM read, and with w > 0 up to `reads` random ones (every planted
    question among them) through hybrid read blocks."""
    replies = dialogue.replies()
    if not config.every_reply:
        replies = replies[-1:]
    window = rng.randint(0, config.max_window) if window is None else window
    if window == 0:
        return Plan(0, [j for j in replies if j >= 1], [])
    hybrid = [j for j in replies if j - window >= 1]  # j - window < 1: plain full text
    facts = [ask for _, ask in dialogue.facts if ask in hybrid]
    rest = [j for j in hybrid if j not in facts]
    hybrid = sorted(facts + rng.sample(rest, max(0, min(len(rest), config.reads - len(facts)))))
    pure = [j for j in replies if j >= 1] if config.pure_replies else []
    return Plan(window, pure, hybrid)


def step_blocks(dialogue: Dialogue, plan: Plan) -> tuple[list[tuple[list[int], int, bool]],
                                                         list[tuple[int, int]]]:
    """The blocks of a step's forward (every exchange up to the last scored one as a
    compression block, then one read block per hybrid reply) and, for each scored reply,
    the block it is read in."""
    ex, w = dialogue.exchanges, plan.window
    last = max([*plan.pure, *plan.hybrid])
    blocks = [(ex[i], i, i < last) for i in range(last + 1)]
    blocks += [([t for e in ex[j - w:j + 1] for t in e], j - w, False) for j in plan.hybrid]
    block_of = [(j, j) for j in plan.pure] + [(j, last + 1 + k) for k, j in enumerate(plan.hybrid)]
    return blocks, block_of


def dialogue_loss(compressor: Compressor, dialogue: Dialogue, plan: Plan,
                  config: TrainConfig, teacher: bool = True) -> dict[str, torch.Tensor]:
    """Mean over the scored replies of (NLL + kl_weight x KL to the full-context model), each
    reply's terms a mean over its tokens; and the parts. One student forward (compression
    blocks, then the hybrid read blocks), one teacher forward."""
    ex, starts = dialogue.exchanges, dialogue.reply_starts
    blocks, block_of = step_blocks(dialogue, plan)
    last = max([*plan.pure, *plan.hybrid])
    layout = block_layout([Block(len(t), g, c) for t, g, c in blocks], compressor.n_comp,
                          compressor.method)
    rows, spans = [], []
    for j, b in block_of:  # rows predicting reply j's tokens in block b
        index = layout.text_index[b][-len(ex[j]):]
        spans.append((len(rows), len(rows) + len(ex[j]) - starts[j], j))
        rows += index[starts[j] - 1:-1]
    device = compressor.comp.device
    hidden, _ = compressor.block_logits(blocks, torch.tensor(rows, device=device), head=False)
    targets = torch.tensor([t for _, _, j in spans for t in ex[j][starts[j]:]], device=device)
    teacher_hidden = None
    if teacher and config.kl_weight:
        full = [t for e in ex[:last + 1] for t in e]
        offset = [0]
        for e in ex[:last + 1]:
            offset.append(offset[-1] + len(e))
        needed = sorted({j for _, _, j in spans})
        trow = [r for j in needed for r in range(offset[j] + starts[j] - 1, offset[j + 1] - 1)]
        at, where = 0, {}
        for j in needed:
            where[j] = at
            at += len(ex[j]) - starts[j]
        index = [trow[where[j] + k] for a, b, j in spans for k in range(b - a)]
        with torch.no_grad():
            teacher_hidden = compressor.model.model(
                input_ids=torch.tensor([full], device=device)).last_hidden_state[0][index]
    token_nll, token_kl = token_losses(compressor.model.lm_head, hidden, targets,
                                       teacher_hidden)
    per_reply = [(token_nll[a:b].mean(), token_kl[a:b].mean()) for a, b, _ in spans]
    nll = torch.stack([n for n, _ in per_reply]).mean()
    kl = torch.stack([k for _, k in per_reply]).mean()
    return {"loss": config.nll_weight * nll + config.kl_weight * kl, "nll": nll, "kl": kl,
            "replies": torch.tensor(len(spans)), "tokens": torch.tensor(layout.length)}


def token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 teacher_hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token: the NLL of its target and KL(teacher || student) from the last hidden
    states, a chunk of rows at a time, each chunk recomputed in the backward pass: the
    float32 log-probabilities of every scored token at once (rows x vocabulary, three times
    over) would take gigabytes at a 128k vocabulary."""
    chunk = max(1, LOGIT_CHUNK // head.weight.shape[0])
    nll, kl = [], []
    for a in range(0, hidden.shape[0], chunk):
        th = teacher_hidden[a:a + chunk] if teacher_hidden is not None else None
        args = (head, hidden[a:a + chunk], targets[a:a + chunk], th)
        n, k = (checkpoint(_chunk_losses, *args, use_reentrant=False)
                if torch.is_grad_enabled() and hidden.requires_grad else _chunk_losses(*args))
        nll.append(n)
        kl.append(k)
    return torch.cat(nll), torch.cat(kl)


def _chunk_losses(head, hidden, targets, teacher_hidden):
    logp = F.log_softmax(head(hidden).float(), -1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    if teacher_hidden is None:
        return nll, torch.zeros_like(nll)
    with torch.no_grad():
        tl = F.log_softmax(head(teacher_hidden).float(), -1)
    return nll, (tl.exp() * (tl - logp)).sum(-1)


def _trainable_state(compressor: Compressor) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in compressor.named_parameters()}
    return {names[id(p)]: p.detach().cpu().contiguous() for p in compressor.trainable()}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, compressor: Compressor, optimizer, scheduler,
                    step: int, config: TrainConfig, processes: int = 1) -> None:
    """Every piece of the run's state; written to temporary names, then moved into place."""
    save_file(_trainable_state(compressor), out_dir / (CHECKPOINT + ".tmp"))
    tensors: dict[str, torch.Tensor] = {}
    rest = split_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "rng": _rng_state()}, tensors, "")
    save_file(tensors, out_dir / (OPTIMIZER + ".tmp"))
    (out_dir / (OPTIMIZER_STATE + ".tmp")).write_text(json.dumps(rest))
    (out_dir / (STATE + ".tmp")).write_text(json.dumps(
        {"step": step, "data_position": step * config.batch, "processes": processes,
         "config": asdict(config)}, indent=1))
    for name in (CHECKPOINT, OPTIMIZER, OPTIMIZER_STATE, STATE):
        (out_dir / (name + ".tmp")).replace(out_dir / name)
    (out_dir / LEGACY_OPTIMIZER).unlink(missing_ok=True)  # a resumed old run's: superseded


def read_run_state(out_dir: Path) -> dict:
    """The optimizer, schedule and RNG states of the checkpoint in `out_dir`. Tensors and
    JSON only: a checkpoint written before these were (a torch pickle) is read with torch's
    weights-only loader, which refuses any object but tensors and plain containers.
    ValueError says what is wrong and what to do."""
    try:
        if (out_dir / OPTIMIZER_STATE).exists():
            rest = json.loads((out_dir / OPTIMIZER_STATE).read_text())
            saved = join_state(rest, load_file(out_dir / OPTIMIZER))
        else:
            saved = torch.load(out_dir / LEGACY_OPTIMIZER, weights_only=True,
                               map_location="cpu")
        if not isinstance(saved, dict) or not {"optimizer", "scheduler", "rng"} <= set(saved):
            raise ValueError("it lacks the optimizer, schedule or RNG state")
    except pickle.UnpicklingError as exc:  # torch's own text tells how to load it unsafely
        raise ValueError(
            f"The checkpoint in {out_dir} cannot be resumed: {LEGACY_OPTIMIZER} holds objects "
            "other than tensors and plain values, which could run code; nothing from it was "
            "run. Resume only runs you made yourself, or start a new run in an empty --out "
            "folder.") from exc
    except Exception as exc:  # safetensors and json raise their own types
        raise ValueError(
            f"The checkpoint in {out_dir} cannot be resumed: its optimizer state is damaged "
            f"({_said(exc)}). Start a new run in an empty --out folder.") from exc
    return saved


def enable_checkpointing(compressor: Compressor) -> None:
    """Gradient checkpointing of the base model's layers (transformers' own), keeping only
    each layer's input and recomputing the rest in the backward pass. A layer recomputed
    there must see what the forward saw, which lives on the gate (the <COMP> rows, the
    episode layout and its mask) and in the attention choice; both are put back around the
    recomputation, since the forward has cleared them by then."""
    gate, config = compressor.gate, compressor.model.config

    def context():
        saved = (gate.mask, gate.layout, gate.attention_mask, config._attn_implementation)

        @contextlib.contextmanager
        def recompute():
            now = (gate.mask, gate.layout, gate.attention_mask, config._attn_implementation)
            gate.mask, gate.layout, gate.attention_mask, config._attn_implementation = saved
            try:
                yield
            finally:
                gate.mask, gate.layout, gate.attention_mask, config._attn_implementation = now
        return contextlib.nullcontext(), recompute()

    kwargs = {"use_reentrant": False, "context_fn": context}
    model = compressor.model
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train(
    compressor: Compressor,
    dialogues: Callable[[int], Dialogue],
    config: TrainConfig,
    out_dir: Path,
    evaluate: Callable[[], dict] | None = None,
    show_progress: bool = True,
    max_seconds: float | None = None,
    until: int | None = None,
) -> list[dict]:
    """Train to `config.steps` steps in all (resuming from `out_dir` exactly where it
    stopped), or until `max_seconds` have passed; `dialogues(i)` is the i-th dialogue of the
    run (step s takes dialogues s * batch .. s * batch + batch - 1). `until` stops it after
    that step, as running out of time would. Returns this run's log rows (also appended to
    out_dir/train_log.jsonl, with the held-apart `evaluate()` rows every `eval_every` steps).

    Under a launcher (torchrun, accelerate launch) each process takes its share of every
    step's dialogues and the gradients are averaged (`parallel`); the first process alone
    evaluates, logs and writes checkpoints, and every process resumes from them."""
    params = compressor.trainable()
    here = parallel.world("cpu" if compressor.comp.device.type == "cpu" else "auto")
    if config.batch % here.size:
        raise ValueError(f"a step's {config.batch} dialogues (--batch) do not split evenly "
                         f"over {here.size} processes")
    if here.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    for p in compressor.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config))
    start = _resume(out_dir, compressor, optimizer, scheduler, config)
    stepper = parallel.Step(params, here)  # after resuming: DDP starts from rank 0's tensors
    log: list[dict] = []
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not show_progress or not here.main, desc="compressor")
    started = time.monotonic()

    def write(row: dict) -> None:
        log.append(row)
        if here.main:
            with (out_dir / LOG).open("a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluated() -> dict:
        row = evaluate() if evaluate is not None and here.main else {}
        parallel.barrier(here)
        return row

    if evaluate is not None and start == 0:
        write({"step": 0, **evaluated()})
    share = config.batch // here.size
    for step in bar:
        items = []
        for k in range(share):
            index = step * config.batch + here.rank * share + k
            dialogue = dialogues(index)
            items.append((dialogue, plan_for(dialogue, config,
                                             random.Random(f"{config.seed}:{index}:plan"))))
        totals, norm = train_step(stepper, compressor, items, config, optimizer, scheduler)
        first = (items[0][1].window, len(items[0][0].exchanges))
        row = {"step": step + 1, "window": first[0], "exchanges": first[1],
               "lr": scheduler.get_last_lr()[0], "grad_norm": norm,
               "seconds": round(time.monotonic() - started, 2), **totals}
        if config.batch > 1:
            row["batch"] = config.batch
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        out_of_time = parallel.any_rank(
            max_seconds is not None and time.monotonic() - started > max_seconds
            or until is not None and step + 1 >= until, here)
        done = step + 1 == config.steps or out_of_time
        if evaluate is not None and ((step + 1) % config.eval_every == 0 or done):
            row.update(evaluated())
        write(row)
        if ((step + 1) % config.checkpoint_every == 0 or done) and here.main:
            save_checkpoint(out_dir, compressor, optimizer, scheduler, step + 1, config,
                            here.size)
        if out_of_time:
            break
    parallel.barrier(here)  # the last checkpoint is on disk before any process goes on
    return log


def train_step(stepper: parallel.Step, compressor: Compressor,
               items: list[tuple[Dialogue, Plan]], config: TrainConfig, optimizer,
               scheduler) -> tuple[dict[str, float], float]:
    """One optimizer step over this process's (dialogue, plan) items, the gradients averaged
    over every process's: (the loss parts' means over the whole batch, the gradient norm)."""
    params = stepper.params
    training = compressor.model.training
    compressor.model.train()  # transformers checkpoints layers only in training mode
    optimizer.zero_grad()
    totals: dict[str, float] = {}
    for k, (dialogue, plan) in enumerate(items):
        parts = stepper.backward(lambda d=dialogue, p=plan: _scaled_loss(
            compressor, d, p, config, params, len(items)), last=k == len(items) - 1)
        for key, v in parts.items():
            totals[key] = totals.get(key, 0.0) + float(v.detach()) / len(items)
    compressor.model.train(training)
    norm = torch.nn.utils.clip_grad_norm_(params, config.clip)
    optimizer.step()
    scheduler.step()
    totals = parallel.mean(totals, stepper.here)
    totals["loss"] = totals.pop("step_loss")
    return totals, float(norm)


def _scaled_loss(compressor: Compressor, dialogue: Dialogue, plan: Plan, config: TrainConfig,
                 params: list[torch.nn.Parameter], share: int) -> dict[str, torch.Tensor]:
    """A dialogue's loss parts, with "loss" divided by the dialogues a process takes a step
    (their gradients add up to the mean) and the unscaled one as "step_loss". A dialogue
    with nothing to score still touches every trainable (a zero), as DDP wants each step."""
    if not plan.pure and not plan.hybrid:
        zero = sum(p.sum() for p in params) * 0.0
        return {"loss": zero, **{k: zero.detach() for k in ("nll", "kl", "replies", "tokens",
                                                            "step_loss")}}
    parts = dialogue_loss(compressor, dialogue, plan, config)
    return {**parts, "step_loss": parts["loss"].detach(), "loss": parts["loss"] / share}


def _said(exc: Exception) -> str:
    """An error's type and the start of its first line, printable characters only."""
    first = (str(exc).splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: " + "".join(c for c in first if c.isprintable())


def _resume(out_dir: Path, compressor: Compressor, optimizer, scheduler,
            config: TrainConfig) -> int:
    """The step a run in `out_dir` stopped at (0 for a new one), with its state loaded."""
    if not (out_dir / STATE).exists():
        return 0
    try:
        state = json.loads((out_dir / STATE).read_text())
        step = state["step"]
        saved_config = dict(state.get("config", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{out_dir / STATE} is not a training checkpoint ({exc}); start a "
                         "new run in an empty --out folder.") from exc
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{out_dir / STATE} gives no step to resume at ({step!r}).")
    saved_config.setdefault("batch", 1)  # written before the config was
    now = asdict(config)
    changed = [f"{k} {saved_config[k]!r} -> {now[k]!r}" for k in now
               if k in saved_config and k not in RESUMABLE_CHANGES and saved_config[k] != now[k]]
    if changed:
        raise ValueError(f"The checkpoint in {out_dir} was made with another training config "
                         f"({', '.join(changed)}); resume it with the same settings, or start "
                         "a new run in an empty --out folder.")
    has_optimizer = (out_dir / OPTIMIZER_STATE).exists() or (out_dir / LEGACY_OPTIMIZER).exists()
    saved = read_run_state(out_dir) if has_optimizer else None  # checked before any change
    try:
        compressor.load_state_dict(load_file(out_dir / CHECKPOINT), strict=False)
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            _set_rng_state(saved["rng"])
    except Exception as exc:  # safetensors, torch and random raise their own types
        raise ValueError(f"The checkpoint in {out_dir} does not fit this run "
                         f"({_said(exc)}); start a new run in an empty --out folder.") from exc
    return step
