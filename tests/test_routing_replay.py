"""Routing replay (R3) on the tiny MoE: the megatron engine records the experts of every rollout token, the batch
ships them, and the trainer's forwards (old log-probs, reference, training) route exactly as the rollout did --
also after a router change that, without replay, moves tokens to other experts; on the rollout weights the
replayed log-probs equal the engine's."""

from __future__ import annotations

import pytest
import torch

from tests.test_trainer import small_config


@pytest.fixture(scope="module")
def world():
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.engine import MegatronEngine
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from r1mega.rollout import build_rollout_engine
    from r1mega.rollout.base import SamplingParams
    from r1mega.trainer import build_token_batch

    cfg = small_config()
    cfg.rollout.routing_replay = True
    cfg.train.micro_batch_size = 3  # several microbatches (and a padded one) per pass
    rt = init_runtime(cfg.parallel, seed=5, device="cpu")
    tok = CharTokenizer()
    policy = MegatronEngine(cfg, rt, tok.vocab_size)
    engine = build_rollout_engine(cfg, policy.weights, tok)
    prompts = [tok.encode(q) for q in ("12+7=", "3+40=", "55+5=", "9+9=", "70+21=", "1+2=", "8+13=")]
    rolls = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10, seed=1))
    batch = build_token_batch(rolls, tok.pad_id, policy.seq_multiple)
    yield cfg, policy, rolls, batch
    engine.shutdown()
    shutdown_runtime()


class RoutingProbe:
    """Records the experts every router of a model picks (from its routing map) in the forwards it sees."""

    def __init__(self, model) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.seen: dict[int, list[torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, TopKRouter)]

    def _hook(self, router, args, out):
        _, routing_map = out
        self.seen.setdefault(router.layer_number, []).append(routing_map.detach().clone())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _expected_maps(batch, layer: int, mbs: int, num_experts: int) -> list[torch.Tensor]:
    """The rollout's experts as the routing maps megatron builds per microbatch ([S * b, E], sequence-major)."""
    out = []
    routed = batch.routed_experts
    for start in range(0, batch.size, mbs):
        r = routed[start : start + mbs, :, layer - 1]
        if r.shape[0] < mbs and batch.size > mbs:  # the engine pads the last microbatch with zero rows
            r = torch.cat([r, torch.zeros(mbs - r.shape[0], *r.shape[1:], dtype=r.dtype)])
        idx = r.transpose(0, 1).reshape(-1, r.shape[-1])
        out.append(torch.zeros(idx.shape[0], num_experts, dtype=torch.bool).scatter(1, idx, True))
    return out


def _response_rows(batch):
    return [(i, batch.mask[i].nonzero().squeeze(1)) for i in range(batch.size)]


def test_engine_records_the_rollout_experts(world):
    cfg, policy, rolls, batch = world
    m = cfg.model
    for r in rolls:
        n = len(r.prompt_ids) + len(r.response_ids)
        assert r.routed_experts.shape == (n - 1, m.num_layers, m.moe_router_topk)
        assert (r.routed_experts >= 0).all() and (r.routed_experts < m.num_experts).all()
        assert all(len(set(t.tolist())) == m.moe_router_topk for t in r.routed_experts.reshape(-1, 2))
    assert batch.routed_experts.shape == (batch.size, batch.tokens.shape[1], m.num_layers, m.moe_router_topk)


def _masked_response(batch, routing_maps, expected_maps, mbs):
    """Compare only the positions the loss reads (response targets: the routed token is position t of mask[t])."""
    for k, (got, want) in enumerate(zip(routing_maps, expected_maps)):
        s = batch.tokens.shape[1]
        rows = min(mbs, batch.size - k * mbs)
        g = got.view(s, mbs, -1)[:, :rows]
        w = want.view(s, mbs, -1)[:, :rows]
        m = batch.mask[k * mbs : k * mbs + rows].T.bool()  # [S-1, rows]
        yield g[:-1][m], w[:-1][m]


def test_trainer_forwards_replay_the_rollout_experts(world):
    cfg, policy, rolls, batch = world
    from r1mega.batch import TokenBatch
    from r1mega.trainer import rollout_logprob_gap

    mbs, layers = cfg.train.micro_batch_size, cfg.model.num_layers
    probe = RoutingProbe(policy.model)
    try:
        batch.old_logp, _ = policy.compute_logprobs(batch, 1.0)
        for layer in range(1, layers + 1):
            want = _expected_maps(batch, layer, mbs, cfg.model.num_experts)
            assert len(probe.seen[layer]) == len(want)
            for got, exp in zip(probe.seen[layer], want):
                assert torch.equal(got, exp), f"layer {layer}: the forward did not route as the rollout"
        # on the rollout weights, replayed log-probs equal the engine's
        diff, known = rollout_logprob_gap(rolls, batch, True)
        assert known.sum() > 20 and diff.max() < 1e-4

        # a router change that moves tokens to other experts without replay ...
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if name.endswith("router.weight"):
                    p.add_(torch.randn_like(p) * 2.0)
        probe.seen.clear()
        routed, batch.routed_experts = batch.routed_experts, None

        def _maps(r, layer):
            return _expected_maps(
                TokenBatch(batch.tokens, batch.mask, routed_experts=r), layer, mbs, cfg.model.num_experts
            )

        policy.compute_logprobs(batch, 1.0)
        moved = any(
            not torch.equal(g, w)
            for layer in range(1, layers + 1)
            for g, w in _masked_response(batch, probe.seen[layer], _maps(routed, layer), mbs)
        )
        assert moved, "degenerate test: the router change did not move any response token"
        # ... is undone by replay, in the log-prob pass of the policy and of the reference
        batch.routed_experts = routed
        probe.seen.clear()
        policy.compute_logprobs(batch, 1.0)
        ref_probe = RoutingProbe(policy.ref_model)
        try:
            policy.compute_logprobs(batch, 1.0, reference=True)
        finally:
            ref_probe.close()
        for seen in (probe.seen, ref_probe.seen):
            for layer in range(1, layers + 1):
                want = _expected_maps(batch, layer, mbs, cfg.model.num_experts)
                assert len(seen[layer]) == len(want) and all(torch.equal(g, w) for g, w in zip(seen[layer], want))
    finally:
        probe.close()


def test_training_step_replays(world):
    cfg, policy, rolls, batch = world
    from r1mega.objectives import build_objective

    mbs = cfg.train.micro_batch_size
    batch.old_logp, _ = policy.compute_logprobs(batch, 1.0)
    batch.ref_logp, _ = policy.compute_logprobs(batch, 1.0, reference=True)
    batch.advantages = torch.randn(batch.size, 1, generator=torch.Generator().manual_seed(0)) * batch.mask
    probe = RoutingProbe(policy.model)
    try:
        m = policy.forward_backward(batch, build_objective(cfg, policy.device), lr=1e-3)
    finally:
        probe.close()
    assert m["update_ok"] == 1.0
    for layer in range(1, cfg.model.num_layers + 1):
        want = _expected_maps(batch, layer, mbs, cfg.model.num_experts)
        assert len(probe.seen[layer]) == len(want)
        assert all(torch.equal(g, w) for g, w in zip(probe.seen[layer], want))
