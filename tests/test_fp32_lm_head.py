"""train.fp32_lm_head: the output layer of a bf16 model in fp32 gives log-probs far closer to an fp64 recompute
(from the same bf16 hidden states and weights) than bf16 logits do; gradients still reach the bf16 weight; the
engine and the SGLang start-up honour the switch."""

from __future__ import annotations

import pytest
import torch

from r1mega.config import Config


@pytest.fixture(scope="module")
def runtime():
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime

    rt = init_runtime(Config().parallel, seed=0, device="cpu")
    yield rt
    shutdown_runtime()


def _bf16_model(vocab: int):
    from r1mega.model.builder import build_gpt_model

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_experts, m.max_position_embeddings = 1, 64, 128, None, 32
    cfg.train.precision = "bf16"
    model = build_gpt_model(cfg.model, cfg.parallel, cfg.train, vocab, torch.device("cpu"))
    with torch.no_grad():
        model.output_layer.weight.normal_(0, 0.5)  # logits of a few units: bf16 rounds them visibly
    return model


def _logprobs_and_hidden(model, tokens):
    from r1mega.grpo.logprobs import token_logprobs

    seen = {}
    h = model.output_layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("hidden", args[0].detach()))
    s = tokens.shape[1]
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    logits = model(tokens, torch.arange(s).unsqueeze(0), mask)
    h.remove()
    logp, _ = token_logprobs(logits[:, :-1], tokens[:, 1:])
    return logits, logp, seen["hidden"]


def test_fp32_head_matches_fp64_better_than_bf16(runtime):
    from r1mega.engine import use_fp32_lm_head

    vocab = 4096
    model = _bf16_model(vocab)
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits16, logp16, hidden = _logprobs_and_hidden(model, tokens)
        use_fp32_lm_head(model)
        logits32, logp32, hidden32 = _logprobs_and_hidden(model, tokens)
    assert logits16.dtype == torch.bfloat16 and logits32.dtype == torch.float32
    assert torch.equal(hidden.float(), hidden32.float()), "the layers below the head are untouched"
    # fp64 recompute from the same bf16 hidden states and weight ([s, b, h] -> [b, s, V])
    exact = (hidden.double() @ model.output_layer.weight.double().T).transpose(0, 1)
    exact = torch.log_softmax(exact[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    err16 = (logp16.double() - exact).abs().mean().item()
    err32 = (logp32.double() - exact).abs().mean().item()
    assert err32 < 1e-5 and err16 > 100 * err32, (err16, err32)

    logits, logp, _ = _logprobs_and_hidden(model, tokens)  # with grad: the bf16 weight still learns
    logp.sum().backward()
    g = model.output_layer.weight.grad
    assert g is not None and g.dtype == torch.bfloat16 and g.abs().sum() > 0


def test_sglang_gets_enable_fp32_lm_head(runtime, monkeypatch):

    from r1mega.data.tokenizer import CharTokenizer
    from tests.test_sglang_engine import FakeEngine, install_fake_sglang, make_policy, small_config

    install_fake_sglang(monkeypatch)
    from r1mega.rollout.sglang_engine import SGLangRolloutEngine

    cfg, tok = small_config(), CharTokenizer()
    policy = make_policy(cfg, tok)
    for flag in (False, True):
        cfg.train.fp32_lm_head = flag
        engine = SGLangRolloutEngine(cfg, policy, tok)
        assert FakeEngine.instances[-1].kwargs.get("enable_fp32_lm_head", False) is flag
        engine.shutdown()
