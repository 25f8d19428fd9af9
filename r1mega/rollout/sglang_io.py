"""SGLang's request and response formats <-> r1mega's SamplingParams and Rollout (pure functions, no SGLang import):
what :class:`r1mega.rollout.sglang_engine.SGLangRolloutEngine` sends and how it reads what comes back."""

from __future__ import annotations

import base64
import math
from typing import Any, Optional

import torch

from r1mega.rollout.base import Rollout, SamplingParams


def request_seed(seed: int, dp_rank: int, index: int) -> int:
    """A distinct, reproducible per-request seed (SGLang's ``sampling_seed`` is per request)."""
    return (seed * 1_000_003 + dp_rank * 65_537 + index) % (2**31 - 1)


def sampling_dict(params: SamplingParams, eos_id: int, seed: Optional[int]) -> dict[str, Any]:
    sp: dict[str, Any] = {
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k) if params.top_k > 0 else -1,  # ours: 0 = off; SGLang: -1 = off, 1 = greedy
        "max_new_tokens": int(params.max_new_tokens),
        "stop_token_ids": [int(eos_id)],
        "no_stop_trim": True,
        "skip_special_tokens": False,
    }
    if seed is not None:
        sp["sampling_seed"] = seed
    return sp


def decode_routed_experts(value: Any, num_layers: int, topk: int) -> torch.Tensor:
    """SGLang's ``meta_info["routed_experts"]`` (base64 of int32 [seq_len - 1, num_layers, topk], every layer,
    token t = the position routed; sglang/srt/managers/tokenizer_manager.py) -> the Rollout layout."""
    raw = base64.b64decode(value) if isinstance(value, (str, bytes)) else None
    t = torch.frombuffer(bytearray(raw), dtype=torch.int32) if raw is not None else torch.as_tensor(value)
    return t.reshape(-1, num_layers, topk).long()


def scored_logprobs(out: dict[str, Any], tokens: list[int]) -> list[float]:
    """The log-probs of ``tokens``, the tail of a scored sequence, from SGLang's ``input_token_logprobs`` (entries
    (value, token id, text) from logprob_start_len on; the first value None: no logits before it)."""
    entries = (out.get("meta_info") or {}).get("input_token_logprobs") or []
    entries = entries[len(entries) - len(tokens) :] if tokens else []
    if len(entries) != len(tokens) or [int(e[1]) for e in entries] != [int(t) for t in tokens]:
        raise RuntimeError(f"SGLang's input_token_logprobs are not aligned with the {len(tokens)} scored tokens")
    return [math.nan if e[0] is None else float(e[0]) for e in entries]


def to_rollout(
    prompt: list[int], out: dict[str, Any], eos_id: int, routing: Optional[tuple[int, int]] = None
) -> Rollout:
    """One SGLang ``generate`` output -> Rollout (response ends with the stop token iff finished).

    ``routing`` = (num_layers, topk) decodes the routed experts (``rollout.routing_replay``)."""
    ids = [int(t) for t in out["output_ids"]]
    meta = out.get("meta_info") or {}
    entries = meta.get("output_token_logprobs") or []
    lps = [float(e[0]) if e[0] is not None else math.nan for e in entries]
    toks = [int(e[1]) for e in entries]
    n = min(len(ids), len(toks))
    if toks[:n] != ids[:n]:
        raise RuntimeError(f"SGLang log-probs are not aligned with output_ids: {toks[:8]} vs {ids[:8]}")
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind == "abort":
        raise RuntimeError(f"SGLang aborted a request: {reason.get('message')}")
    finished = kind == "stop"
    if finished:
        stop = reason.get("matched")
        stop = int(stop) if isinstance(stop, int) else eos_id
        if not ids or ids[-1] != stop:  # a trimmed stop token goes back: the policy must learn to stop
            ids.append(stop)
    elif ids and ids[-1] == eos_id:
        finished = True  # EOS as the very last allowed token
    lps = lps[: len(ids)] + [math.nan] * (len(ids) - len(lps))
    routed = None
    if routing is not None:
        if meta.get("routed_experts") is None:
            raise RuntimeError(
                "rollout.routing_replay: SGLang returned no routed_experts (enable_return_routed_experts)"
            )
        routed = decode_routed_experts(meta["routed_experts"], *routing)
    return Rollout(list(prompt), ids, lps, finished=finished, routed_experts=routed)
