"""The transformers back end: the same model and context interface as engine.llama_backend.

`Conversation` drives either back end through the same calls (tokenize, render_chat, decode,
remove, shift, get/set state), so memory policies, save/restore and streaming are shared.
The KV cache is transformers' DynamicCache; positions of its cells are tracked here so cells
can be evicted from the middle and the rest shifted down (their keys re-rotated), as in
llama.cpp. Weights run in bfloat16 on CUDA and float32 on the CPU. On CUDA the context is
engine.hf_fast's (a static cache and CUDA-graph decoding) unless CCM_CHAT_HF_FAST=0; which
one is made is engine.hf_open's choice.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers import DynamicCache

from ccm_chat.engine.backend import close_gaps, slots_in_place
from ccm_chat.engine.ccm.files import ModelShape, check_embeddings
from ccm_chat.engine.chat import ChatMessage, for_model
from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.errors import EngineError, ModelError
from ccm_chat.engine.hf_weights import load_pretrained, torch_placement
from ccm_chat.engine.rope import rotate_keys


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


BYTE_DECODER = _byte_decoder()


class HFModel:
    """Weights, tokenizer and chat template, through transformers."""

    def __init__(self, path: Path, device: str, cache_dir: Path) -> None:
        self.path = path
        self.cache_dir = cache_dir
        self.device, dtype = torch_placement(device)
        model, self.tokenizer = load_pretrained(path, cache_dir, dtype)
        self.torch_model = model.to(self.device).eval()
        config = model.config
        self.config = config
        if not self.tokenizer.chat_template:
            raise ModelError(
                f"{path.name} has no chat template, so ccm-chat cannot format a conversation "
                "for it. Use an instruction-tuned (chat) model."
            )
        self.n_vocab = config.vocab_size
        self.n_ctx_train = getattr(config, "max_position_embeddings", 0) or 0
        shape = self.compressor_shape
        self.f16_bytes_per_token = 2 * 2 * shape.n_layer * shape.kv_out
        self.bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        self.add_bos = self.bos is not None and bool(probe) and probe[0] == self.bos
        self._special = set(self.tokenizer.all_special_ids)
        self._byte_level = "Ġ" in "".join(self.tokenizer.convert_ids_to_tokens(
            self.tokenizer(" a b", add_special_tokens=False)["input_ids"]))
        self._eog = self._end_of_generation_ids()
        self.name = Path(str(config.name_or_path or path.stem)).name or path.stem
        self.compressor = None

    @property
    def compressor_shape(self) -> ModelShape:
        """What a compressor's tensors must fit (CompressorFiles.check)."""
        config = self.config
        n_head = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_head
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        return ModelShape(config.hidden_size, config.num_hidden_layers, n_head * head_dim,
                          n_kv * head_dim)

    def load_compressor(self, files) -> object:
        """Put a trained compressor's LoRA and <COMP> table on this model (it wraps q/k/v/o;
        the LoRA acts only where a <COMP> decode switches it on)."""
        from ccm_chat.engine.ccm.compressor import Compressor

        card = files.card
        try:
            comp = Compressor(self.torch_model, card["n_comp"], card["rank"], card["alpha"],
                              card["method"])
            comp.load_trainable(files.weights)
        except (RuntimeError, OSError, ValueError, AttributeError) as exc:
            raise ModelError(f"The compressor in {files.folder} does not fit this model "
                             f"({exc}).") from exc
        self.compressor = comp.to(self.device, next(self.torch_model.parameters()).dtype)
        return self.compressor

    def _end_of_generation_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation = getattr(self.torch_model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
            tok = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tok, int) and tok != self.tokenizer.unk_token_id:
                ids.add(tok)
        return {i for i in ids if i is not None}

    def close(self) -> None:
        self.torch_model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
        # parse_special False: a control token's text in a message stays text, as llama.cpp
        return list(self.tokenizer(text.decode("utf-8", "replace"),
                                   add_special_tokens=add_special,
                                   split_special_tokens=not parse_special)["input_ids"])

    def piece(self, token: int, special: bool) -> bytes:
        if token in self._special:
            return self.tokenizer.convert_ids_to_tokens(token).encode() if special else b""
        if self._byte_level:
            text = self.tokenizer.convert_ids_to_tokens(token)
            return bytes(BYTE_DECODER.get(ch, 32) for ch in text)
        return self.tokenizer.decode([token]).encode()

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog

    def render_chat(self, messages: Sequence[ChatMessage], add_assistant: bool) -> bytes:
        """Format messages with the model's chat template; a NUL goes in as U+FFFD, as on
        llama.cpp (chat.for_model), so both back ends show the model the same text."""
        chat = [{"role": for_model(m.role), "content": for_model(m.content)} for m in messages]
        text = self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_assistant)
        return text.encode()


class HFContext:
    """One KV sequence on a DynamicCache, with llama.cpp's position semantics."""

    def __init__(self, model: HFModel, n_ctx: int, n_batch: int = 512) -> None:
        self.model = model
        self.n_ctx = min(n_ctx, model.n_ctx_train) if model.n_ctx_train else n_ctx
        self.n_batch = n_batch
        self.kv_type = "f16"  # unquantized (float32 on the CPU, bfloat16 on CUDA)
        self.evicts = True
        self.flash_attn = None  # llama.cpp's V cache layout; a torch cache has none to record
        # capabilities (engine.backend.Context)
        self.merges = True  # merge_slots averages cells (CCM-merge)
        self.needs_compaction = False  # shift() re-rotates keys at once; no holes are left
        self.batches_cheaply = model.device.type == "cuda"  # see engine.backend.Context
        self._rotary = getattr(model.torch_model.model, "rotary_emb", None)
        forward = inspect.signature(model.torch_model.forward).parameters
        # transformers renamed past_key_values to cache (5.2x); take whichever this one has
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.clear()

    def close(self) -> None:
        self.cache = None

    @torch.inference_mode()
    def decode_embeddings(self, vectors: np.ndarray, start_pos: int,
                          adapter: object | None = None) -> None:
        """Decode the <COMP> vectors at start_pos.. (the compressor's own table), its LoRA on
        for them when `adapter` is given (the model holds the LoRA; the mask gates it)."""
        comp = self.model.compressor
        if comp is None:
            raise EngineError("No compressor is installed on this model.")
        check_embeddings(vectors, self.model.config.hidden_size)
        n = len(vectors)
        self._check_room(start_pos, n)
        device = self.model.device
        embeds = torch.as_tensor(vectors, device=device).to(comp.comp.dtype)[None]
        comp.gate.mask = torch.full((1, n), float(adapter is not None), device=device,
                                    dtype=comp.comp.dtype)
        try:
            self._forward_embeddings(embeds, start_pos)
        finally:
            comp.gate.mask = None
        self.positions = torch.cat([self.positions, torch.arange(start_pos, start_pos + n)])

    def slots_over_text(self, vectors: np.ndarray, start: int, end: int,
                        adapter: object, drop: int = 0) -> None:
        slots_in_place(self, vectors, start, end, adapter, drop)

    def close_gaps(self, start: int, end: int, drop: int) -> None:
        close_gaps(self, start, end, drop)  # an edit on the device: a few kernels

    def _check_room(self, start_pos: int, n: int) -> None:
        if start_pos != len(self.positions):
            raise EngineError(f"decode at {start_pos}, but the cache holds {len(self.positions)}.")

    def _forward_embeddings(self, embeds: torch.Tensor, start_pos: int) -> None:
        pos = torch.arange(start_pos, start_pos + embeds.shape[1], device=self.model.device)
        self.model.torch_model(inputs_embeds=embeds, position_ids=pos[None], use_cache=True,
                               logits_to_keep=1, **{self._cache_arg: self.cache})

    @torch.inference_mode()
    def merge_slots(self, n: int, weight: float) -> None:
        """Fold the last n cells into the first n as a running mean; drop the last n."""
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                head = t[:, :, :n] * (1 - weight) + t[:, :, -n:] * weight
                setattr(layer, name, torch.cat([head.to(t.dtype), t[:, :, n:-n]], 2))
        self.positions = self.positions[:-n]

    def clear(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.positions = torch.empty(0, dtype=torch.long)
        self._last = np.zeros(self.model.n_vocab, dtype=np.float32)

    def _layers(self):
        return [layer for layer in self.cache.layers if layer.is_initialized]

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], start_pos: int, want: Sequence[int] = ()) -> dict:
        self._check_room(start_pos, len(tokens))
        wanted = set(want) | {len(tokens) - 1}
        rows: dict[int, np.ndarray] = {}
        for offset in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[offset: offset + self.n_batch])
            # the chunk's last row too: a chunk with no wanted row still gives a tensor
            keep = [i for i in range(len(chunk) - 1) if offset + i in wanted]
            logits = self._forward_tokens(chunk, start_pos + offset, [*keep, len(chunk) - 1])
            for j, i in enumerate(keep):
                rows[offset + i] = logits[j].float().cpu().numpy()
            end = offset + len(chunk) - 1
            if end in wanted and end != len(tokens) - 1:
                rows[end] = logits[-1].float().cpu().numpy()
            self._keep_last(logits[-1])
            self.positions = torch.cat([self.positions, torch.arange(
                start_pos + offset, start_pos + offset + len(chunk))])
        return rows

    def _forward_tokens(self, chunk: list[int], start: int, keep: list[int]) -> torch.Tensor:
        """Logits rows (at `keep`) of a chunk decoded at positions start.."""
        device = self.model.device
        pos = torch.arange(start, start + len(chunk), device=device)
        out = self.model.torch_model(
            input_ids=torch.tensor([chunk], device=device), position_ids=pos[None],
            **{self._cache_arg: self.cache}, use_cache=True,
            logits_to_keep=torch.tensor(keep, device=device, dtype=torch.long))
        return out.logits[0]

    def _keep_last(self, row: torch.Tensor) -> None:
        self._last = row.float().cpu().numpy()

    def logits(self, i: int = -1) -> np.ndarray:
        return self._last.copy()

    def compact(self, last_token: int) -> None:
        """Nothing to do: an edit leaves this cache as a save would restore it."""

    def redecode(self, token: int, pos: int) -> None:
        self.remove(pos)
        self.decode([token], pos)

    def _in_range(self, p0: int, p1: int) -> torch.Tensor:
        hi = p1 if p1 >= 0 else np.iinfo(np.int64).max
        return (self.positions >= p0) & (self.positions < hi)

    @torch.inference_mode()
    def remove(self, p0: int, p1: int = -1) -> None:
        keep = ~self._in_range(p0, p1)
        if bool(keep.all()):
            return
        self._keep_cells(keep.nonzero().flatten())
        self.positions = self.positions[keep]

    def _keep_cells(self, index: torch.Tensor) -> None:
        for layer in self._layers():
            idx = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(2, idx)
            layer.values = layer.values.index_select(2, idx)

    @torch.inference_mode()
    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Move cells at positions [p0, p1) by delta, re-rotating their keys now."""
        if self._rotary is None:
            raise EngineError("This model has no rotary position embedding to shift.")
        sel = self._in_range(p0, p1).nonzero().flatten()
        if len(sel) == 0 or delta == 0:
            return
        self._rotate_cells(sel, delta)
        self.positions[sel] += delta

    def _rotate_cells(self, sel: torch.Tensor, delta: int) -> None:
        step = torch.full((len(sel),), delta)
        for layer in self._layers():
            idx = sel.to(layer.keys.device)
            moved = rotate_keys(self._rotary, layer.keys.index_select(2, idx), step)
            layer.keys.index_copy_(2, idx, moved)

    def pos_max(self) -> int:
        return int(self.positions.max()) if len(self.positions) else -1

    def pos_min(self) -> int:
        return int(self.positions.min()) if len(self.positions) else -1

    def state_size(self) -> int:
        return sum(t.nelement() * t.element_size()
                   for layer in self._layers() for t in (layer.keys, layer.values))

    def get_state(self) -> bytes:
        tensors = {"positions": self.positions.clone(), **self._cells_on_cpu()}
        return save_tensors(tensors, metadata={"layers": str(self.model.config.num_hidden_layers)})

    def _cells_on_cpu(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self._layers()):
            out[f"k.{i}"] = layer.keys.contiguous().cpu()
            out[f"v.{i}"] = layer.values.contiguous().cpu()
        return out

    @torch.inference_mode()
    def set_state(self, data: bytes | memoryview) -> None:
        self.clear()
        try:
            tensors = load_tensors(bytes(data))  # safetensors reads bytes only
            n_layers = self.model.config.num_hidden_layers
            if any(f"k.{i}" not in tensors for i in range(n_layers)):
                raise ValueError("layers missing")
            positions = tensors["positions"].long()
            keys = [tensors[f"k.{i}"] for i in range(n_layers)]
            if any(k.shape[2] != len(positions) for k in keys):
                raise ValueError("positions do not match the cells")
            self._load_cells(keys, [tensors[f"v.{i}"] for i in range(n_layers)])
        except Exception as exc:  # safetensors raises its own error types
            self.clear()
            raise EngineError(f"The saved memory state could not be read ({exc}).") from exc
        self.positions = positions

    def _load_cells(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k.to(self.model.device), v.to(self.model.device), i)
        self.cache = cache

    def sampler(self, params: SamplingParams) -> NumpySampler:
        return NumpySampler(params)


class NumpySampler:
    """Greedy, or temperature then top-p then a seeded draw, over the last logits, after the
    repetition penalty on the tokens it drew (llama.cpp's rule; DRY is llama.cpp's only)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.drawn: list[int] = []

    def sample(self, ctx: HFContext) -> int:
        p = self.params
        logits = ctx.logits(-1).astype(np.float64)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and self.drawn:
            seen = np.unique(self.drawn[-p.repeat_last_n:])
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / p.repeat_penalty,
                                    logits[seen] * p.repeat_penalty)
        token = self._draw(logits)
        self.drawn.append(token)
        return token

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        probs = np.exp((logits - logits.max()) / p.temperature)
        probs /= probs.sum()
        order = np.argsort(-probs)
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs[order]), p.top_p)) + 1
            order = order[:cut]
        kept = probs[order] / probs[order].sum()
        return int(order[self.rng.choice(len(order), p=kept)])

    def close(self) -> None:
        pass
