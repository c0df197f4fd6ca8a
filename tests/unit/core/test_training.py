"""The shared loop's loss: the chunked output layer over target positions only must give the
loss and the gradients of the plain path (the model's logits over every position)."""

from __future__ import annotations

import pytest
import torch

from zhllama.core.training.loss import IGNORE_INDEX, CausalLMLoss
from zhllama.recipes.chinese_llama_alpaca.configs import PretrainConfig
from zhllama.recipes.chinese_llama_alpaca.pretrain import apply_lora


def _tiny(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            tie_word_embeddings=tied,
        )
    )


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 17), generator=gen)
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX  # a masked prompt
    labels[2, 12:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return ids, labels, mask


def _plain_loss(model, ids, labels, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }


@pytest.mark.parametrize("tile", [None, 64])
@pytest.mark.parametrize("setup", ["lora_modules_to_save", "full_model", "tied_embeddings"])
def test_chunked_loss_and_gradients_equal_the_plain_path(setup, tile, monkeypatch):
    """tile 64: the vocabulary of 300 in tiles (the last one ragged), as a real vocabulary runs."""
    if tile:
        monkeypatch.setattr("zhllama.core.training.loss.VOCAB_TILE", tile)
    model = _tiny(tied=setup == "tied_embeddings")
    if setup == "lora_modules_to_save":
        model = apply_lora(model, PretrainConfig(lora_dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)  # B = 0 would make every LoRA gradient on A vanish
    ids, labels, mask = _batch()
    plain_loss, plain = _grads(model, lambda: _plain_loss(model, ids, labels, mask))
    chunked_loss, chunked = _grads(model, lambda: CausalLMLoss(model, chunk_rows=5)(ids, labels, mask)[0])
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-6)
    assert set(chunked) == set(plain) and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("tile", [None, 64])
def test_chunked_loss_scales_its_gradients_by_the_upstream_gradient_once(tile, monkeypatch):
    """The output layer's gradients are scaled in place in backward: a scaled loss gives scaled
    gradients, and a second backward through the same graph is refused, not silently doubled."""
    if tile:
        monkeypatch.setattr("zhllama.core.training.loss.VOCAB_TILE", tile)
    model = _tiny(tied=True)
    ids, labels, mask = _batch()
    _, whole = _grads(model, lambda: CausalLMLoss(model, chunk_rows=5)(ids, labels, mask)[0])
    _, quarter = _grads(model, lambda: 0.25 * CausalLMLoss(model, chunk_rows=5)(ids, labels, mask)[0])
    for name in whole:
        torch.testing.assert_close(quarter[name], 0.25 * whole[name], atol=1e-6, rtol=1e-5, msg=name)
    loss = CausalLMLoss(model, chunk_rows=5)(ids, labels, mask)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_count_and_no_grad_mode():
    model = _tiny()
    ids, labels, mask = _batch()
    with torch.no_grad():
        loss, count = CausalLMLoss(model)(ids, labels, mask)
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(_plain_loss(model, ids, labels, mask).detach()), rel=1e-6)


def test_bf16_autocast_matches_fp32_within_bf16_precision_and_keeps_fp32_gradients():
    model = apply_lora(_tiny(), PretrainConfig(lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    ids, labels, mask = _batch()
    ref_loss, ref = _grads(model, lambda: CausalLMLoss(model, chunk_rows=5)(ids, labels, mask)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_loss, low = _grads(model, lambda: CausalLMLoss(model, chunk_rows=5)(ids, labels, mask)[0])
    assert low_loss != ref_loss  # the matmuls did run in bf16
    assert low_loss == pytest.approx(ref_loss, rel=1e-2)
    assert set(low) == set(ref)
    for name in ref:
        assert low[name].dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(low[name].flatten(), ref[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


class _Rows:
    """Four SFT-like rows of different target counts (a masked prompt, padding), for the loop."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.rows = []
        for n, masked in ((9, 2), (17, 12), (5, 0), (13, 4)):
            ids = torch.randint(0, 300, (n,), generator=gen).tolist()
            self.rows.append((ids, [IGNORE_INDEX] * masked + ids[masked:]))

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self):
        return [len(ids) for ids, _ in self.rows]

    def collate(self, indices):
        from zhllama.core.training.loss import pad_rows

        return pad_rows([self.rows[i] for i in indices], pad_id=0)


def _one_sgd_step(per_device: int, accumulation: int) -> dict[str, torch.Tensor]:
    """The weight change of one optimizer step of plain SGD (lr 1): minus the step's gradient."""
    from zhllama.core.config import TrainArgs
    from zhllama.core.training.loop import Dist, _optimizer_step, batch_order
    from zhllama.core.training.loss import CausalLMObjective

    model, source, objective = _tiny(), _Rows(), CausalLMObjective()
    cfg = TrainArgs(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    order = batch_order(source, per_device, seed=0, epoch=0, group_by_length=False)
    batches = [source.collate(order[a]) for a in range(accumulation)]
    _optimizer_step(objective.module(model), model, batches, cfg, Dist(), objective, optimizer, scheduler, None)
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_gradient_accumulation_gives_the_single_batch_gradient() -> None:
    """Two micro-batches of 2 rows and one batch of the same 4 rows: the same step, because the
    loss is the sum over target tokens divided by the step's total count. The rows' target counts
    differ (7, 5, 4, 9: micro-batches of 12 and 13), so a mean of micro-batch means fails this test (tried)."""
    whole, accumulated = _one_sgd_step(per_device=4, accumulation=1), _one_sgd_step(per_device=2, accumulation=2)
    for name, delta in whole.items():
        assert torch.allclose(accumulated[name], delta, atol=1e-6, rtol=1e-4), name


def test_modules_to_save_get_their_own_learning_rate() -> None:
    """LoRA at learning_rate, the fully trained embed_tokens/lm_head at modules_to_save_learning_rate;
    the scheduler scales both, and the logged lr is the main one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import tiny_config
    from zhllama.core.training.loop import build_optimizer

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    cfg = tiny_config("sft", learning_rate=1e-3, modules_to_save_learning_rate=1e-4)
    model = apply_lora(LlamaForCausalLM(config), cfg)
    optimizer = build_optimizer(model, cfg)
    by_lr: dict[float, int] = {}
    for group in optimizer.param_groups:
        by_lr[group["lr"]] = by_lr.get(group["lr"], 0) + sum(p.numel() for p in group["params"])
    assert by_lr[1e-4] == 2 * 64 * 16  # embed_tokens and lm_head, in full
    assert by_lr[1e-3] == sum(p.numel() for p in model.parameters() if p.requires_grad) - 2 * 64 * 16
    assert {g["lr"] for g in build_optimizer(model, tiny_config("sft", learning_rate=1e-3)).param_groups} == {1e-3}


def _prefixed_batch(prefix: int = 20):
    """SFT-shaped rows: one common prompt prefix, then each row's own text, its masked part and
    a short target, right-padded to different lengths."""
    gen = torch.Generator().manual_seed(2)
    common = torch.randint(3, 300, (prefix,), generator=gen)
    rows = []
    for length in (9, 14, 6, 11):
        own = torch.randint(3, 300, (length,), generator=gen)
        ids = torch.cat([common, own]).tolist()
        labels = [IGNORE_INDEX] * (len(ids) - 3) + ids[-3:]
        rows.append((ids, labels))
    from zhllama.core.training.loss import pad_rows

    return pad_rows(rows, 0)


@pytest.mark.parametrize("tied", [False, True])
def test_shared_prefix_gives_the_loss_and_gradients_of_every_row_computed_whole(tied: bool) -> None:
    """SFT rows share the template and instruction: computed once (share_prefix) the loss and
    every gradient equal those of each row computed whole (dropout off, where they are exact)."""
    from zhllama.core.training.loss import shared_prefix_length

    model = apply_lora(_tiny(tied=tied), PretrainConfig(lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = _prefixed_batch()
    assert shared_prefix_length(batch["input_ids"], batch["labels"][:, 1:] != IGNORE_INDEX) == 20
    whole_loss, whole = _grads(model, lambda: CausalLMLoss(model, share_prefix=False)(**batch)[0])
    shared_loss, shared = _grads(model, lambda: CausalLMLoss(model, share_prefix=True)(**batch)[0])
    assert shared_loss == pytest.approx(whole_loss, rel=1e-6)
    assert set(shared) == set(whole) and len(whole) > 0
    for name in whole:
        torch.testing.assert_close(shared[name], whole[name], atol=2e-5, rtol=1e-4, msg=name)


def test_shared_prefix_stops_before_any_target_and_needs_rows_in_common() -> None:
    from zhllama.core.training.loss import MIN_SHARED_PREFIX, shared_prefix_length

    batch = _prefixed_batch(prefix=30)
    ids, select = batch["input_ids"], batch["labels"][:, 1:] != IGNORE_INDEX
    assert shared_prefix_length(ids, select) == 30
    early = select.clone()
    early[1, 24] = True  # a target predicted from inside the common part: the prefix ends there
    assert shared_prefix_length(ids, early) == 24
    assert shared_prefix_length(ids[:1], select[:1]) == 0  # one row: nothing to share
    short = _prefixed_batch(prefix=MIN_SHARED_PREFIX - 1)
    assert shared_prefix_length(short["input_ids"], short["labels"][:, 1:] != IGNORE_INDEX) == 0
    blocks = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(3))  # PT blocks
    assert shared_prefix_length(blocks, torch.ones(4, 63, dtype=torch.bool)) == 0


def test_fast_dropout_has_dropouts_distribution_and_gradient() -> None:
    """FastDropout keeps each element with probability 1 - p, scales by 1 / (1 - p), passes the
    gradient through the same mask, is the identity in eval mode, and follows torch's seed."""
    from zhllama.core.training.dropout import FastDropout, use_fast_lora_dropout

    layer = FastDropout(0.05)
    x = torch.ones(1000, 500, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.95) < 0.002  # 500K draws: 6 standard errors is ~0.0018
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.95))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.tensor(1 / 0.95))
    torch.manual_seed(0)
    assert torch.equal(layer(x.detach()), y.detach())  # the same seed, the same mask
    assert not torch.equal(layer(x.detach()), y.detach())  # and a fresh one next call
    layer.eval()
    assert torch.equal(layer(x.detach()), x.detach())
    model = apply_lora(_tiny(), PretrainConfig(lora_dropout=0.05))  # apply_lora swaps them in
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.05]
    assert dropouts and all(type(m) is FastDropout for m in dropouts)
    assert use_fast_lora_dropout(model) == 0  # nothing left to swap


def _lora_pair(tied: bool = False):
    """The same LoRA model twice (B made non-zero so the adapters matter): peft's forward, and
    the fused one apply_lora installs."""
    from zhllama.core.training.lora_fused import use_fused_lora

    cfg = PretrainConfig(lora_dropout=0.05)
    fused = apply_lora(_tiny(tied), cfg)
    plain = apply_lora(_tiny(tied), cfg)
    for module in plain.modules():
        module.__dict__.pop("forward", None)  # back to peft's own forward
    torch.manual_seed(5)
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
        q.data.copy_(p.data)
    assert use_fused_lora(fused) == 0  # apply_lora already did: nothing left to change
    return fused, plain


@pytest.mark.parametrize("tied", [False, True])
def test_fused_lora_gives_peft_loss_and_gradients(tied: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused LoRA layer draws the same dropout masks and gives peft's loss and every
    trainable gradient; in eval mode and under no_grad it is peft's forward itself."""
    from zhllama.core.training import lora_fused

    calls = []
    apply = lora_fused._LoraLinear.apply
    monkeypatch.setattr(lora_fused._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    fused, plain = _lora_pair(tied)
    fused.train(), plain.train()
    ids, labels, mask = _batch()
    results = []
    for model in (fused, plain):
        torch.manual_seed(11)
        loss, count = CausalLMLoss(model)(ids, labels, mask)
        (loss / count).backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_f, grads_f), (loss_p, grads_p) = results
    assert len(calls) == 2 * 7  # the fused path ran: 2 layers x 7 adapted projections, once
    assert torch.allclose(loss_f, loss_p, rtol=1e-5)
    assert grads_f.keys() == grads_p.keys() and any("lora_A" in n for n in grads_f)
    for name, grad in grads_f.items():
        assert grad is not None and torch.allclose(grad, grads_p[name], rtol=1e-4, atol=1e-6), name
    fused.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)


def test_fused_lora_steps_aside_when_it_does_not_apply() -> None:
    """Merged adapters, disabled adapters and bf16 autocast go through peft's own forward."""
    from zhllama.core.training.lora_fused import _fusable

    fused, _ = _lora_pair()
    layer = next(m for n, m in fused.named_modules() if n.endswith("q_proj"))
    x = torch.randn(2, 5, 32)
    assert _fusable(layer, x, (), {}) == "default"
    assert _fusable(layer, x.double(), (), {}) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fusable(layer, x, (), {}) is None
    with torch.no_grad():
        assert _fusable(layer, x, (), {}) is None
    with fused.disable_adapter():
        assert _fusable(layer, x, (), {}) is None
    layer.merge()
    assert _fusable(layer, x, (), {}) is None


def _host(monkeypatch, capability: str, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "expected"),
    [
        ("AVX512", True, False, "bf16"),  # AVX512-BF16 (Zen 4, Cooper Lake)
        ("AVX512", False, True, "bf16"),  # AMX (Sapphire Rapids)
        ("AVX512", False, False, "fp32"),  # AVX512 without bf16 matmuls (Skylake): emulated
        ("AVX2", True, True, "fp32"),  # held to AVX2 (ATEN_CPU_CAPABILITY): emulated
        ("DEFAULT", False, False, "fp32"),
    ],
)
def test_auto_precision_picks_bf16_only_where_the_cpu_has_bf16_matmuls(
    monkeypatch, capability, avx512_bf16, amx, expected
):
    from zhllama.core.training.loop import resolve_precision

    _host(monkeypatch, capability, avx512_bf16, amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_auto_precision_trains_as_the_precision_it_resolves_to(monkeypatch, tmp_path) -> None:
    """One training step with precision auto gives the losses of the explicit precision it stands for."""
    from zhllama.core.config import TrainArgs
    from zhllama.core.training.loop import train

    def losses(precision: str, name: str) -> list[float]:
        cfg = TrainArgs(
            per_device_train_batch_size=4, max_steps=2, eval_steps=0, save_steps=0, logging_steps=1, precision=precision
        )
        result = train(_tiny(), _Rows(), None, cfg, tmp_path / name)
        return [entry["loss"] for entry in result.log_history if "loss" in entry]

    fp32, bf16 = losses("fp32", "fp32"), losses("bf16", "bf16")
    assert fp32 != bf16
    _host(monkeypatch, "AVX2", True, True)
    assert losses("auto", "auto-avx2") == fp32
    _host(monkeypatch, "AVX512", True, False)
    assert losses("auto", "auto-bf16") == bf16
