"""The CCM compressor's pieces on a tiny random Llama made here (CPU, float32)."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ccm_chat.engine.ccm import Compressor, ConditionalLoRALinear, episode_layout
from tests.device import TEST_DEVICE


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def with_active_lora(n_comp: int, std: float,
                     method: str = "concat") -> tuple[LlamaForCausalLM, Compressor]:
    """A compressor whose LoRA is not the zero it starts as, so the <COMP> path shows."""
    model = tiny_llama()
    comp = Compressor(model, n_comp=n_comp, rank=4, method=method)
    for m in model.modules():
        if isinstance(m, ConditionalLoRALinear):
            torch.nn.init.normal_(m.lora_b, std=std)
    return model, comp


def test_concat_layout_blocks_and_positions() -> None:
    layout = episode_layout([3, 2, 2], n_comp=2)
    assert layout.length == 3 + 2 + 2 + 2 + 2
    assert layout.is_comp.tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    # compact positions: turn 2 starts after the 2 memory slots, turn 3 after 4
    assert layout.positions.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 4, 5]
    assert layout.view_delta.tolist() == [-3, -2]  # C1 moves from 3-4 to 0-1, C2 from 4-5 to 2-3
    allowed, memory = layout.allowed(), layout.memory_allowed()
    # turn 2 sees itself and C1's memory view, not turn 1's text nor C1 raw
    assert allowed[5, 5] and not allowed[5, 0] and not allowed[5, 3]
    assert memory[5].tolist() == [True, True, False, False]
    # C2 sees turn 2's text, itself causally, and C1's view; nothing sees the future
    assert allowed[8, 5] and allowed[8, 7] and not allowed[7, 8] and not allowed[8, 2]
    # the last turn sees both groups' views and its own text only
    assert memory[10].tolist() == [True, True, True, True]
    assert allowed[10].nonzero().flatten().tolist() == [9, 10]
    assert not memory[:5].any()


def test_merge_layout_sees_only_the_merged_memory() -> None:
    layout = episode_layout([3, 2, 2], n_comp=2, method="merge")
    memory = layout.memory_allowed()
    assert layout.comp_index().tolist() == [[3, 4], [7, 8]]
    # memory is n slots: turns 2 and 3 both start at position 2, every group moves to 0-1
    assert layout.positions.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 2, 3]
    assert layout.view_delta.tolist() == [-3, -4]
    # turn 2 and C2 see M1 (columns 0-1); the last turn sees M2, the mean of C1 and C2
    assert memory[5].tolist() == [True, True, False, False]
    assert memory[8].tolist() == [True, True, False, False]
    assert memory[10].tolist() == [False, False, True, True]
    assert not memory[:5].any()


def test_lora_is_active_only_at_comp_positions() -> None:
    model, comp = with_active_lora(n_comp=2, std=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        comp.gate.mask = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
        gated_off = model(input_ids=ids).logits
        comp.gate.mask = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
        gated_on = model(input_ids=ids).logits
    comp.gate.mask = None
    torch.testing.assert_close(gated_off, plain)
    torch.testing.assert_close(gated_on[:, :2], plain[:, :2])  # before the slot: unchanged
    assert (gated_on[:, 2:] - plain[:, 2:]).abs().max() > 1e-3


def test_the_lora_gives_the_same_rows_with_and_without_grad() -> None:
    """Inference runs the LoRA on every row under the mask (no host sync on a GPU), training
    on the <COMP> rows alone: the same logits either way."""
    model, comp = with_active_lora(n_comp=2, std=0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    comp.gate.mask = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    try:
        trained = model(input_ids=ids).logits.detach()
        with torch.no_grad():
            inferred = model(input_ids=ids).logits
    finally:
        comp.gate.mask = None
    torch.testing.assert_close(inferred, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["concat", "merge"])
def test_parallel_and_recursive_paths_give_the_same_logits(method: str) -> None:
    model, comp = with_active_lora(n_comp=3, std=0.2, method=method)
    torch.manual_seed(1)
    turns = [torch.randint(3, 97, (n,)).tolist() for n in (6, 4, 7, 5)]
    with torch.no_grad():
        parallel, layout = comp.parallel_logits(turns)
        recursive = comp.recursive_logits(turns)
    for index, step in zip(layout.text_index, recursive, strict=True):
        torch.testing.assert_close(parallel[index], step, atol=1e-4, rtol=1e-4)
    # and the memory matters: without the <COMP> groups the last turn reads differently
    alone = model(input_ids=torch.tensor([turns[-1]]),
                  position_ids=layout.positions[layout.text_index[-1]][None]).logits[0]
    assert (alone - recursive[-1]).abs().max() > 1e-3


def test_merge_reads_a_different_memory_than_concat() -> None:
    """Same weights, same episode: after two groups the merged mean is not the concat pair."""
    torch.manual_seed(1)
    turns = [torch.randint(3, 97, (n,)).tolist() for n in (6, 4, 7, 5)]
    last = {}
    for method in ("concat", "merge"):
        _, comp = with_active_lora(n_comp=2, std=0.2, method=method)
        with torch.no_grad():
            last[method] = comp.recursive_logits(turns)
    # the second turn reads one group either way; the last reads the mean of three vs all three
    torch.testing.assert_close(last["concat"][1], last["merge"][1])
    assert (last["concat"][-1] - last["merge"][-1]).abs().max() > 1e-3


def test_llama_cpp_runs_the_exported_adapter_like_transformers(hf_engine, tmp_path) -> None:
    """<COMP> slots through the GGUF LoRA in llama.cpp and through the conditional LoRA in
    transformers leave memories that give the next turn the same NLL (default model)."""
    import numpy as np
    from transformers import AutoModelForCausalLM, DynamicCache

    from ccm_chat.engine import Engine
    from ccm_chat.engine.hf_weights import converted_dir
    from ccm_chat.training.export import export_lora_gguf

    source = converted_dir(hf_engine.info.model_path, hf_engine.model.cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    torch.manual_seed(0)
    comp = Compressor(hf, n_comp=4, rank=8, alpha=16)
    for layer in hf.model.layers:  # q and k strongly: their rows are permuted for llama.cpp
        for name, std in (("q_proj", 0.3), ("k_proj", 0.3), ("v_proj", 0.02), ("o_proj", 0.02)):
            torch.nn.init.normal_(getattr(layer.self_attn, name).lora_b, std=std)
    tokenize = hf_engine.model.tokenize
    turn = tokenize(b"<|im_start|>user\nMy dog is called Pixel.<|im_end|>\n"
                    b"<|im_start|>assistant\nNice!<|im_end|>\n", False, True)
    reply = tokenize(b"<|im_start|>user\nWhat is my dog called?<|im_end|>\n"
                     b"<|im_start|>assistant\nYour dog is called Pixel.", False, True)
    start = len(turn) + 4

    def nll(rows: np.ndarray) -> float:
        logp = torch.log_softmax(torch.as_tensor(rows, dtype=torch.float64), -1)
        return float(-logp[torch.arange(len(reply) - 1), torch.tensor(reply[1:])].mean())

    def through_transformers(lora: bool) -> float:
        cache = DynamicCache(config=hf.config)
        with torch.no_grad():
            hf(input_ids=torch.tensor([turn]), position_ids=torch.arange(len(turn))[None],
               cache=cache, use_cache=True)
            comp.gate.mask = torch.ones(1, 4) if lora else None
            hf(inputs_embeds=comp.comp[None], position_ids=torch.arange(len(turn), start)[None],
               cache=cache, use_cache=True)
            comp.gate.mask = None
            keep = torch.arange(len(turn), start)  # only the <COMP> cells stay
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(2, keep)
                layer.values = layer.values.index_select(2, keep)
            logits = hf(input_ids=torch.tensor([reply]), cache=cache, use_cache=True,
                        position_ids=torch.arange(start, start + len(reply))[None]).logits[0]
        return nll(logits[:-1].numpy())

    eng = Engine.load(n_ctx=512, device=TEST_DEVICE, compression="balanced", compressor=False)
    try:
        adapter = eng.model.load_adapter(export_lora_gguf(hf, tmp_path / "lora.gguf", 16.0))
        ctx = eng.ctx

        def through_llama_cpp(lora: bool) -> float:
            ctx.clear()
            ctx.decode(turn, 0)
            ctx.decode_embeddings(comp.comp.detach().numpy(), len(turn),
                                  adapter if lora else None)
            ctx.remove(0, len(turn))
            rows = ctx.decode(reply, start, want=range(len(reply) - 1))
            return nll(np.stack([rows[i] for i in range(len(reply) - 1)]))

        results = {lora: (through_transformers(lora), through_llama_cpp(lora))
                   for lora in (False, True)}
    finally:
        eng.close()
    (hf_off, ll_off), (hf_on, ll_on) = results[False], results[True]
    assert ll_on - ll_off > 0.3, results  # the adapter matters (measured 0.43)
    # measured 0.005 with the adapter (0.51 when q/k rows are not permuted), and 0.27 without
    # it: llama.cpp's Q4_1 kernels against the dequantized float32 weights on a 4-slot memory
    assert abs(hf_on - ll_on) < 0.15, results
    assert abs(hf_off - ll_off) < 0.35, results


def recall_dialogue(step: int, seed: int = 0):
    """A fact (token) planted in the first exchange, asked for in the last; filler between.
    Every exchange is (user tokens, reply tokens); all replies are scored."""
    from ccm_chat.training.data import Dialogue

    g = torch.Generator().manual_seed(seed * 100_000 + step)
    fact = int(torch.randint(10, 97, (1,), generator=g))
    filler = torch.randint(10, 97, (4,), generator=g).tolist()
    return Dialogue([[3, fact, 4, 8], filler, [5, 6, fact, 7]], [3, 2, 2], ((0, 2),))


def tiny_config(**kw):
    from ccm_chat.training.train import TrainConfig

    return TrainConfig(**{"steps": 6, "lr": 1e-2, "warmup": 2, "max_window": 1,
                          "checkpoint_every": 3, **kw})


@pytest.mark.parametrize("method", ["concat", "merge"])
def test_hybrid_read_blocks_match_the_turn_by_turn_hybrid_loop(method: str) -> None:
    """The reply of exchange j reading the slots of exchanges < j - w and the text of
    j - w..j verbatim: read blocks in one parallel forward give what the loop gives."""
    _, comp = with_active_lora(n_comp=2, std=0.2, method=method)
    torch.manual_seed(1)
    turns = [torch.randint(3, 97, (n,)).tolist() for n in (6, 4, 7, 5, 3, 6)]
    last = len(turns) - 1
    for window in (1, 2):
        reads = [j for j in range(len(turns)) if j - window >= 1]
        blocks = [(t, i, i < last) for i, t in enumerate(turns)]
        blocks += [([x for t in turns[j - window:j + 1] for x in t], j - window, False)
                   for j in reads]
        with torch.no_grad():
            parallel, layout = comp.block_logits(blocks)
            loop = comp.hybrid_recursive_logits(turns, window)
        for k, j in enumerate(reads):
            rows = layout.text_index[len(turns) + k][-len(turns[j]):]
            torch.testing.assert_close(parallel[rows], loop[j], atol=1e-4, rtol=1e-4)
        # the verbatim text matters: the hybrid read is not the pure one
        assert (loop[-1] - comp.recursive_logits(turns)[-1]).abs().max() > 1e-3


def test_a_hybrid_read_block_sits_right_after_the_slots_it_reads() -> None:
    from ccm_chat.engine.ccm.layout import Block, block_layout

    # exchanges of 3, 2, 2 tokens compressed into 2 slots each, then exchange 2 read with
    # w = 1: the slots of exchange 0, then exchanges 1 and 2 verbatim
    layout = block_layout([Block(3, 0, True), Block(2, 1, True), Block(2, 2, False),
                           Block(4, 1, False)], n_comp=2)
    read = layout.text_index[3]
    assert layout.positions[read].tolist() == [2, 3, 4, 5]  # after the 2 slots of group 0
    memory, allowed = layout.memory_allowed(), layout.allowed()
    assert memory[read].all(0).tolist() == [True, True, False, False]  # group 0 only
    assert allowed[read[-1]].nonzero().flatten().tolist() == read  # its own block, causal
    with pytest.raises(ValueError, match="only 2 came before"):
        block_layout([Block(3, 0, True), Block(2, 1, True), Block(2, 3, False)], n_comp=2)


def test_kl_to_the_full_context_model_is_zero_where_nothing_is_compressed() -> None:
    """The teacher reads the whole history with the adapter off: a read block holding all
    of it verbatim is the teacher, so KL = 0 and the NLL is the base model's; through the
    slots both move."""
    from ccm_chat.training.train import Plan, dialogue_loss

    model, comp = with_active_lora(n_comp=2, std=0.2)
    dialogue = recall_dialogue(0)
    everything = dialogue_loss(comp, dialogue, Plan(2, [], [2]), tiny_config())
    ids = torch.tensor([[t for e in dialogue.exchanges for t in e]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    reply = [10, 11]  # the last exchange's reply tokens, flat
    base = -logp[[r - 1 for r in reply], ids[0, reply]].mean()
    assert float(everything["kl"].detach()) < 1e-6
    torch.testing.assert_close(everything["nll"], base, atol=1e-5, rtol=1e-5)
    through_slots = dialogue_loss(comp, dialogue, Plan(0, [1, 2], []), tiny_config())
    assert float(through_slots["kl"].detach()) > 1e-3 and int(through_slots["replies"]) == 2


def test_a_step_scores_every_reply_and_reads_the_planted_questions_hybrid() -> None:
    import random

    from ccm_chat.training.data import Dialogue
    from ccm_chat.training.train import plan_for

    dialogue = Dialogue([[1, 2, 3]] * 30, [1] * 30, ((3, 20),))
    plan = plan_for(dialogue, tiny_config(reads=4), random.Random(0), window=3)
    assert plan.pure == list(range(1, 30))  # every reply that reads a slot
    assert 20 in plan.hybrid and len(plan.hybrid) == 4 and min(plan.hybrid) >= 4
    last_only = plan_for(dialogue, tiny_config(every_reply=False), random.Random(0), 0)
    assert last_only.pure == [29] and not last_only.hybrid


def test_training_learns_to_recall_through_the_comp_slots(tmp_path) -> None:
    from ccm_chat.training.train import Plan, dialogue_loss, train

    model, comp = with_active_lora(n_comp=2, std=0.0)
    held_out = [recall_dialogue(step, seed=7) for step in range(16)]  # other facts
    base_weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    config = tiny_config(steps=120, warmup=5, min_lr=1.0, kl_weight=0.0,
                         checkpoint_every=60)

    def held() -> float:
        with torch.no_grad():
            return sum(float(dialogue_loss(comp, d, Plan(0, [2], []), config)["nll"])
                       for d in held_out) / len(held_out)

    before = held()
    log = train(comp, recall_dialogue, config, tmp_path, show_progress=False)
    after = held()
    assert len(log) == 120 and after < before - 0.5, (before, after)
    # the base model did not move: only the <COMP> table and the LoRA learn
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, base_weight)


def test_training_resumes_exactly_where_it_stopped(tmp_path) -> None:
    """3 steps, stop, 3 more from the checkpoint == 6 steps straight: the same weights, the
    same AdamW moments, the same losses (the data at a step is a function of the step)."""
    from ccm_chat.training.train import STATE, read_run_state, train

    def run(out, stops):
        _, comp = with_active_lora(n_comp=2, std=0.0)
        log = []
        for until in stops:  # a run cut short there (out of time), then run again
            log += train(comp, recall_dialogue, tiny_config(), out, show_progress=False,
                         until=until)
        return comp, log

    straight, log_straight = run(tmp_path / "a", [None])
    resumed, log_resumed = run(tmp_path / "b", [3, None])
    assert [r["step"] for r in log_resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_resumed] == [r["loss"] for r in log_straight]
    for a, b in zip(straight.trainable(), resumed.trainable(), strict=True):
        assert torch.equal(a, b)
    state_a = read_run_state(tmp_path / "a")
    state_b = read_run_state(tmp_path / "b")
    for k, v in state_a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], state_b["optimizer"]["state"][k]["exp_avg_sq"])
    assert state_a["scheduler"] == state_b["scheduler"]
    assert '"data_position": 6' in (tmp_path / "b" / STATE).read_text()
    # a finished run only loads
    again, _ = run(tmp_path / "b", [])
    assert train(again, recall_dialogue, tiny_config(steps=6), tmp_path / "b",
                 show_progress=False) == []
    assert all(torch.equal(a, b) for a, b in zip(again.trainable(), resumed.trainable(),
                                                 strict=True))


def test_a_resume_with_another_training_config_is_refused(tmp_path) -> None:
    """The checkpoint keeps the run's TrainConfig: going on under another (a different lr,
    schedule, data) is refused by name; only when it writes may change."""
    from ccm_chat.training.train import STATE, train

    _, comp = with_active_lora(n_comp=2, std=0.0)
    train(comp, recall_dialogue, tiny_config(), tmp_path, show_progress=False, until=3)
    assert '"lr": 0.01' in (tmp_path / STATE).read_text()
    refused = r"another training config \(steps 6 -> 8, lr 0.01 -> 0.02\)"
    with pytest.raises(ValueError, match=refused):
        train(comp, recall_dialogue, tiny_config(lr=2e-2, steps=8), tmp_path,
              show_progress=False)
    log = train(comp, recall_dialogue, tiny_config(checkpoint_every=1), tmp_path,
                show_progress=False)
    assert [r["step"] for r in log] == [4, 5, 6]

def test_dialogue_data_splits_three_ways_and_plants_facts(
        hf_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import random
    from collections import Counter

    from ccm_chat.training.data import (
        Corpus,
        ExchangeTokens,
        load_corpora,
        next_turn_probes,
        recall_probes,
        split_of,
        training_dialogue,
    )
    from ccm_chat.training.recipe import model_tokens

    monkeypatch.delenv("CCM_CHAT_DATA", raising=False)  # the sets shipped in the package
    conversations = load_corpora()
    sources = Counter(k.split(":")[0] for k in conversations)
    assert {"chitchat", "topical_chat", "synthetic_persona_chat", "memorybank"} <= set(sources)
    shares = Counter(split_of(k) for k in conversations)
    assert 0.05 < shares["test"] / len(conversations) < 0.15
    assert 0.05 < shares["validation"] / len(conversations) < 0.15
    tokenizer = hf_engine.model.tokenizer
    tok = model_tokens(tokenizer)
    exchanges = ExchangeTokens(tok)
    pairs = [("Hello there", "Hi! How are you?"), ("Fine.", "Good to hear.")]
    rendered = tok.render([{"role": r, "content": c} for p in pairs
                           for r, c in zip(("user", "assistant"), p, strict=True)], False)
    assert "".join(a + b for i, p in enumerate(pairs)
                   for a, b in [exchanges.texts(*p, i == 0)]) == rendered
    small = {k: v for i, (k, v) in enumerate(sorted(conversations.items())) if i % 25 == 0}
    corpus = Corpus(small, "validation", exchanges)
    assert all(split_of(k) == "validation" for k in corpus.keys)
    dialogue = training_dialogue(corpus, random.Random(4), 40, 60, recall_share=1.0)
    assert 20 <= len(dialogue.exchanges) <= 60 and dialogue.facts
    assert tokenizer.decode(dialogue.exchanges[0]).startswith("<|im_start|>system")
    for said, asked in dialogue.facts:
        start = dialogue.reply_starts[asked]
        value = tokenizer.decode(dialogue.exchanges[asked][start:]).split()[-1]
        assert value.split(".")[0] in tokenizer.decode(dialogue.exchanges[said])
        assert tokenizer.decode(dialogue.exchanges[asked][:start]).endswith("assistant\n")
    probe = recall_probes(corpus, 8, 1)[0]
    assert 8 <= len(probe.context) <= 10 and len({tuple(a) for a in probe.answers}) == 4
    turn = next_turn_probes(corpus, 6, 2)
    assert len(turn) == 2 and all(len(p.context) == 5 for p in turn)


def test_episodes_split_and_shape(hf_engine) -> None:
    from ccm_chat.training.data import (
        POOLS,
        _held_value,
        chitchat_episodes,
        chitchat_pool,
        held_apart,
        load_chitchat,
        recall_cases,
    )
    from ccm_chat.training.recipe import model_tokens

    conversations = load_chitchat()
    held = [cid for cid in conversations if held_apart(cid)]
    assert 0.05 < len(held) / len(conversations) < 0.15
    tok = model_tokens(hf_engine.model.tokenizer)
    header = tok.tokenize("<|im_start|>assistant\n")
    train_pool = chitchat_pool(conversations, held_out=False)
    for episode in islice(chitchat_episodes(tok, train_pool, seed=3), 20):
        assert episode.context and episode.reply
        assert episode.prompt[-len(header):] == header  # the reply follows the assistant header
        assert all(len(ex) <= 2 * 96 for ex in episode.context)
        # one <COMP> group per exchange: each holds a user turn and the assistant's answer
        texts = [tok_text(hf_engine, ex) for ex in episode.context]
        assert all(t.count("<|im_start|>user") == 1 and "<|im_start|>assistant" in t
                   for t in texts)
    # recall: the answer's value is planted in the first exchange; held-apart values are
    # never the ones training asks for
    case = next(recall_cases(tok, train_pool, held_out=True, seed=1))
    value = tok_text(hf_engine, case.answers[0]).split()[-1].rstrip(".")
    assert value in tok_text(hf_engine, case.episode.context[0])
    assert _held_value(value) and len(case.answers) == 4
    trained = {v for vs in POOLS.values() for v in vs if not _held_value(v)}
    assert value not in trained


def tok_text(engine, ids: list[int]) -> str:
    return engine.model.tokenizer.decode(ids)


def test_train_compressor_command_writes_what_the_app_picks_up(tmp_path, monkeypatch,
                                                               hf_engine, capsys) -> None:
    import json

    from ccm_chat.app.cli import main
    from ccm_chat.app.service import load_engine
    from ccm_chat.app.settings import Settings
    from ccm_chat.engine.ccm.files import (
        EXTRA_DIRS_ENV,
        compressor_dirs,
        find_compressor,
        user_compressor_dir,
    )

    monkeypatch.setenv("CCM_CHAT_CACHE_DIR", str(hf_engine.model.cache_dir))  # converted
    assert main(["train-compressor", "--steps", "3", "--n-comp", "2",
                 "--eval-episodes", "2", "--device", "cpu"]) == 0
    (out,) = user_compressor_dir().iterdir()  # the default --out: the user's compressors
    card = json.loads((out / "compressor.json").read_text())
    assert card["steps"] == 3 and card["n_comp"] == 2 and card["method"] == "concat"
    assert card["base_fingerprint"] == hf_engine.fingerprint
    # the app's engine (llama.cpp) runs it ahead of the shipped compressor
    with load_engine(Settings(compression="balanced", context_size=256), None) as eng:
        assert eng.compression.method.startswith("ccm-")
        assert eng.ccm is not None and eng.ccm.files.folder == out
        assert eng.ccm.vectors.shape[0] == 2  # its 2 slots an exchange
    # a compressor kept elsewhere is found through $CCM_CHAT_COMPRESSORS, which wins
    elsewhere = tmp_path / "elsewhere"
    out.rename(elsewhere)
    assert find_compressor(hf_engine.fingerprint).folder.parent == compressor_dirs()[-1]
    monkeypatch.setenv(EXTRA_DIRS_ENV, str(elsewhere))
    assert find_compressor(hf_engine.fingerprint).folder == elsewhere
