"""Routing replay (R3) for MoE: the experts the rollout engine chose are replayed in every trainer forward.

A rollout engine and the trainer route a token to different experts whenever their router scores differ by
rounding (or the weights moved between the two); the token then sees another network and its importance ratio
is meaningless. R3 fixes the trainer's choice to the rollout's, through megatron-core 0.16.1's own hook
(``megatron/core/transformer/moe/router_replay.py``: ``RouterReplay`` with ``RECORD`` / ``REPLAY_FORWARD``,
called by ``topk_routing_with_score_function``; the router's probabilities are still computed from the
trainer's scores at the replayed experts, so the router keeps its gradient).

Layout (one home, shared with the SGLang engine's ``routed_experts`` return): per sequence
``[tokens, num_layers, topk]`` int, token t = the position whose hidden state was routed (0..n-2; the last
token is never forwarded by an engine), every layer of the model (dense layers hold placeholders); batched as
``TokenBatch.routed_experts`` [B, S, num_layers, topk]. A router sees the tokens of its input ``[s, b, h]``
flattened sequence-major (and only its TP rank's sequence chunk under sequence parallelism).

megatron's static batch engine decodes through its own controller; the megatron rollout engine records the
routing in one RECORD forward over each finished sequence on the rollout weights (:func:`record_routing`),
which the KV-cache steps match up to rounding ties.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


class RoutingReplay:
    """megatron's RouterReplay on the routers of one GPTModel (this pipeline stage's layers)."""

    def __init__(self, model) -> None:
        self.routers: list[TopKRouter] = [m for m in model.modules() if isinstance(m, TopKRouter)]
        for r in self.routers:
            if r.router_replay is None:  # what TransformerConfig.moe_enable_routing_replay would build
                r.router_replay = RouterReplay()
        self.config = model.config
        self.topk = self.config.moe_router_topk

    def _tokens(self, per_row: torch.Tensor) -> torch.Tensor:
        """[b, S, k] -> the router's token order [S_local * b, k] (sequence-major, this TP rank's chunk)."""
        x = per_row.transpose(0, 1)
        if self.config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            x = x.chunk(tp, dim=0)[parallel_state.get_tensor_model_parallel_rank()]
        return x.reshape(-1, x.shape[-1])

    def replay(self, routed: torch.Tensor) -> None:
        """Make the next forward route as ``routed`` [b, S, num_layers, topk] says."""
        for r in self.routers:
            r.router_replay.clear_indices()
            r.router_replay.set_target_indices(self._tokens(routed[:, :, r.layer_number - 1]).long())
            r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def record(self) -> None:
        for r in self.routers:
            r.router_replay.clear_indices()
            r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)

    def recorded(self, b: int, s: int, num_layers: int) -> torch.Tensor:
        """The last forward's experts as [b, S, num_layers, topk] (single TP chunk: called with SP off)."""
        out = torch.arange(self.topk).expand(b, s, num_layers, self.topk).clone()
        for r in self.routers:
            idx = r.router_replay.get_recorded_indices().view(s, b, self.topk).transpose(0, 1)
            out[:, :, r.layer_number - 1] = idx.cpu()
        return out

    def off(self) -> None:
        for r in self.routers:
            r.router_replay.clear_indices()
            r.router_replay.clear_router_replay_action()


@torch.no_grad()
def record_routing(model, sequences: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The experts ``model`` routes each sequence's tokens to: [len - 1, num_layers, topk] each (RECORD forward)."""
    from r1mega.batch import pad_rows

    rr = RoutingReplay(model)
    tokens = pad_rows(sequences, 0).to(device)
    b, s = tokens.shape
    mask = None if device.type == "cuda" else torch.ones(1, 1, s, s, dtype=torch.bool, device=device).triu(1)
    rr.record()
    try:
        model(tokens, torch.arange(s, device=device).unsqueeze(0).expand(b, s), mask)
        routed = rr.recorded(b, s, model.config.num_layers)
    finally:
        rr.off()
    return [routed[i, : len(seq) - 1] for i, seq in enumerate(sequences)]
