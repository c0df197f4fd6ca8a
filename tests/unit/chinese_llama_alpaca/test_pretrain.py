import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from zhllama.core.io import InputError
from zhllama.recipes.chinese_llama_alpaca.modeling import load_model, load_tokenizer
from zhllama.recipes.chinese_llama_alpaca.pretrain import load_blocks, run_pretrain


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_model(model_dir).state_dict().items()}


def test_stage1_trains_only_embeddings(tmp_path: Path, tiny_base: Path, vocab_run: Path, small_corpus) -> None:
    cfg = tiny_config("pretrain", stage=1, block_size=64, max_steps=3)
    metrics = run_pretrain(
        tiny_base, vocab_run / "tokenizer", [small_corpus["train"]], tmp_path / "s1", cfg, cache_dir=tmp_path / "c"
    )
    base, trained = _state(tiny_base), _state(tmp_path / "s1" / "model")
    embeds = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, tensor in base.items():
        if name not in embeds:
            assert torch.equal(trained[name], tensor), f"{name} changed in stage 1"
    for name in embeds:
        assert trained[name].shape[0] == len(load_tokenizer(vocab_run / "tokenizer"))
        assert not torch.equal(trained[name][: tensor.shape[0]], base[name]), f"{name} did not train"
    assert metrics["trainable_parameters"] == sum(trained[n].numel() for n in embeds)


def test_stage2_adapter_holds_lora_and_full_embeddings(pt_run: Path, tiny_base: Path, vocab_run: Path) -> None:
    adapter = load_file(str(pt_run / "adapter" / "adapter_model.safetensors"))
    vocab = len(load_tokenizer(vocab_run / "tokenizer"))
    assert adapter["base_model.model.model.embed_tokens.weight"].shape[0] == vocab
    assert adapter["base_model.model.lm_head.weight"].shape[0] == vocab
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b), (
        "LoRA B starts at zero: it must have trained"
    )
    base = _state(tiny_base)
    assert not torch.equal(
        adapter["base_model.model.model.embed_tokens.weight"][:32000], base["model.embed_tokens.weight"]
    )
    config = json.loads((pt_run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 32, 0.05)
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert set(config["modules_to_save"]) == {"embed_tokens", "lm_head"}
    assert _state(tiny_base)["model.layers.0.self_attn.q_proj.weight"].equal(
        base["model.layers.0.self_attn.q_proj.weight"]
    )
    metrics = json.loads((pt_run / "metrics.json").read_text())
    assert metrics["steps"] == 8 and len(json.loads((pt_run / "train_log.json").read_text())) >= 8


def test_resume_matches_uninterrupted(tmp_path: Path, tiny_base: Path, vocab_run: Path, small_corpus) -> None:
    args = dict(tokenizer_dir=vocab_run / "tokenizer", train_files=[small_corpus["train"]], cache_dir=tmp_path / "c")
    cfg = tiny_config("pretrain", block_size=64, max_steps=6, save_steps=3)
    run_pretrain(tiny_base, out_dir=tmp_path / "full", cfg=cfg, **args)
    run_pretrain(tiny_base, out_dir=tmp_path / "cut", cfg=cfg, stop_after_steps=3, **args)
    assert not (tmp_path / "cut" / "adapter").exists(), "an interrupted run must not write final outputs"
    run_pretrain(tiny_base, out_dir=tmp_path / "cut", cfg=cfg, resume=True, **args)
    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)
    log_full = [h["loss"] for h in json.loads((tmp_path / "full" / "train_log.json").read_text()) if "loss" in h]
    log_cut = [h["loss"] for h in json.loads((tmp_path / "cut" / "train_log.json").read_text()) if "loss" in h]
    assert log_cut == pytest.approx(log_full, abs=1e-6)


def test_resume_refuses_a_checkpoint_of_another_run(
    tmp_path: Path, tiny_base: Path, vocab_run: Path, small_corpus
) -> None:
    args = dict(tokenizer_dir=vocab_run / "tokenizer", train_files=[small_corpus["train"]], cache_dir=tmp_path / "c")
    run_pretrain(
        tiny_base,
        out_dir=tmp_path / "r",
        cfg=tiny_config("pretrain", block_size=64, max_steps=4, save_steps=2),
        stop_after_steps=2,
        **args,
    )
    other = tiny_config("pretrain", block_size=64, max_steps=4, save_steps=2, lora_target_modules=["q_proj", "v_proj"])
    with pytest.raises(InputError, match="checkpoint does not fit this run: missing"):
        run_pretrain(tiny_base, out_dir=tmp_path / "r", cfg=other, resume=True, **args)
    ckpt = sorted((tmp_path / "r" / "checkpoints").iterdir())[-1]
    (ckpt / "trainable.safetensors").write_bytes(b"truncated")
    with pytest.raises(InputError, match="checkpoint is missing or corrupted"):
        run_pretrain(
            tiny_base,
            out_dir=tmp_path / "r",
            cfg=tiny_config("pretrain", block_size=64, max_steps=4, save_steps=2),
            resume=True,
            **args,
        )


def test_loss_falls_on_the_default_corpus(tmp_path: Path, tiny_base: Path, vocab_run: Path, small_corpus) -> None:
    cfg = tiny_config("pretrain", block_size=64, max_steps=40, per_device_train_batch_size=4, learning_rate=3e-3)
    run_pretrain(
        tiny_base, vocab_run / "tokenizer", [small_corpus["train"]], tmp_path / "pt", cfg, cache_dir=tmp_path / "c"
    )
    losses = [h["loss"] for h in json.loads((tmp_path / "pt" / "train_log.json").read_text()) if "loss" in h]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"


def test_block_cache_is_keyed_on_content(tmp_path: Path, vocab_run: Path, small_corpus) -> None:
    tok = load_tokenizer(vocab_run / "tokenizer")
    text = small_corpus["train"].read_text(encoding="utf-8")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text, encoding="utf-8")
    b.write_text(text, encoding="utf-8")
    blocks_a, info_a = load_blocks([a], tok, vocab_run / "tokenizer", 64, tmp_path / "cache")
    blocks_b, info_b = load_blocks([b], tok, vocab_run / "tokenizer", 64, tmp_path / "cache")
    every = range(len(blocks_a))
    assert (info_a["cache"], info_b["cache"]) == ("miss", "hit")
    assert (blocks_a.read(every) == blocks_b.read(every)).all()
    a.write_text(text + "新的一行文字。\n" * 50, encoding="utf-8")  # same name, new content
    blocks_c, info_c = load_blocks([a], tok, vocab_run / "tokenizer", 64, tmp_path / "cache")
    assert info_c["cache"] == "miss" and len(blocks_c) > len(blocks_a)
    # the shards hold tokens, not blocks: another block size cuts the same cached shards
    half, info_d = load_blocks([b], tok, vocab_run / "tokenizer", 32, tmp_path / "cache")
    assert info_d["cache"] == "hit" and len(half) in (2 * len(blocks_a), 2 * len(blocks_a) + 1)
    first = blocks_a.read([0])
    assert first.shape == (1, 64) and int(first[0, 0]) == tok.bos_token_id
