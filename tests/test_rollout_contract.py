"""The rollout-engine contract, run on every registered engine: megatron (in-process), SGLang (against the fake
``sglang`` of tests/test_sglang_engine.py, which enforces SGLang's memory-saver rules), and a third engine
registered from this test module. Same constructor (``from_config(cfg, weights, tokenizer)``, through the
registry), same Rollout invariants, and the same behaviour on release / update / resume ordering: after
``update_weights`` (sent while released) an engine generates what a freshly built engine on the new weights
generates, and release / resume are idempotent.

Rollout.routed_experts is not part of the contract: megatron's static engine does not return the routing.
"""

from __future__ import annotations

import pytest
import torch

from r1mega.config import MegatronRolloutConfig, RolloutConfig, SGLangRolloutConfig
from r1mega.data.tokenizer import CharTokenizer
from r1mega.registry import ROLLOUT_ENGINES
from r1mega.rollout import build_rollout_engine
from r1mega.rollout.base import HFWeights, Rollout, SamplingParams
from tests.test_sglang_engine import install_fake_sglang, small_config


class BigramEngine:
    """A third engine: next-token logits = lm_head @ embed[last token], from the HF tensors it was last sent.

    It keeps its own copy, dropped on release (as SGLang's memory saver drops the weights' contents), and
    pulls the weights again when it must generate without them.
    """

    settings_type = RolloutConfig

    @classmethod
    def from_config(cls, cfg, weights, tokenizer) -> BigramEngine:
        return cls(weights, tokenizer.eos_id)

    def __init__(self, weights, eos_id: int) -> None:
        self.weights, self.eos_id, self.tables = weights, eos_id, None

    def update_weights(self, source) -> None:
        named = dict(p for bucket in source.hf_buckets(1 << 20) for p in bucket)
        self.tables = (named["model.embed_tokens.weight"].double(), named["lm_head.weight"].double())

    def release_memory(self) -> None:
        self.tables = None

    def resume_memory(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if self.tables is None:
            self.update_weights(self.weights)
        emb, head = self.tables
        g = torch.Generator().manual_seed(params.seed or 0)
        out = []
        for prompt in prompts:
            ids, lps, last = [], [], prompt[-1]
            for _ in range(params.max_new_tokens):
                logp = torch.log_softmax(head @ emb[last] / params.temperature, -1)
                last = int(logp.argmax()) if params.greedy else int(torch.multinomial(logp.exp(), 1, generator=g))
                ids.append(last)
                lps.append(float(logp[last]))
                if last == self.eos_id:
                    break
            out.append(Rollout(list(prompt), ids, lps, finished=ids[-1] == self.eos_id))
        return out

    def shutdown(self) -> None:
        self.tables = None


ROLLOUT_ENGINES.register("bigram", "tests.test_rollout_contract:BigramEngine")
ENGINES = ["megatron", "sglang", "bigram"]
SETTINGS = {
    "megatron": MegatronRolloutConfig(max_batch_size=8, max_seq_len=32),
    "sglang": SGLangRolloutConfig(max_batch_size=8, bucket_mb=1),
    "bigram": RolloutConfig(backend="bigram"),
}
PROMPTS = [[10, 11, 12], [20, 21], [30], [40, 41, 42, 43], [50, 51]]


@pytest.fixture
def world(runtime, monkeypatch, request):
    """(cfg, weights, tokenizer, build) for the engine named by the test's parameter."""
    from r1mega.model.builder import build_gpt_model

    name = request.param
    if name == "sglang":
        install_fake_sglang(monkeypatch)  # restored after the test
    cfg, tok = small_config(), CharTokenizer()
    cfg.rollout = SETTINGS[name]
    model = build_gpt_model(cfg.model, cfg.parallel, cfg.train, tok.vocab_size, torch.device("cpu"))
    with torch.no_grad():
        model.output_layer.weight.mul_(40.0)  # a peaked distribution: greedy paths differ by prompt
    weights = HFWeights(model, cfg.model, tok.vocab_size)
    built = []

    def build():
        built.append(build_rollout_engine(cfg, weights, tok))
        return built[-1]

    yield name, weights, tok, build
    for engine in built:
        engine.shutdown()


def _ids(rolls: list[Rollout]) -> list[list[int]]:
    return [r.response_ids for r in rolls]


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_rollouts_keep_the_contract(world):
    name, weights, tok, build = world
    engine = build()
    assert type(engine) is ROLLOUT_ENGINES.get(name)
    n = 5
    engine.resume_memory()
    rolls = engine.generate(PROMPTS, SamplingParams(temperature=0.9, max_new_tokens=n, seed=4))
    assert [r.prompt_ids for r in rolls] == PROMPTS  # one Rollout per prompt, in order
    for r in rolls:
        assert len(r.logprobs) == len(r.response_ids) >= 1
        assert r.finished == (r.response_ids[-1] == tok.eos_id)  # a finished answer ends with its EOS
        assert len(r.response_ids) <= n + 1 and (r.finished or len(r.response_ids) == n)
    again = engine.generate(PROMPTS, SamplingParams(temperature=0.9, max_new_tokens=n, seed=4))
    assert _ids(again) == _ids(rolls), "the same seed must give the same samples"
    engine.release_memory()


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_release_update_resume_ordering(world):
    """generate -> release (twice) -> train -> update_weights while released -> resume (twice) -> generate gives
    what a fresh engine on the new weights gives; and a release / resume without an update keeps them."""
    name, weights, tok, build = world
    greedy = SamplingParams(top_k=1, max_new_tokens=4)
    engine = build()
    engine.resume_memory()
    first = engine.generate(PROMPTS, greedy)
    engine.release_memory()
    engine.release_memory()
    with torch.no_grad():  # "training": a change that moves every greedy path
        weights.model.output_layer.weight.neg_()
    engine.update_weights(weights)
    engine.resume_memory()
    engine.resume_memory()
    updated = engine.generate(PROMPTS, greedy)
    fresh = build()
    fresh.resume_memory()
    assert _ids(updated) == _ids(fresh.generate(PROMPTS, greedy))
    if name != "sglang":  # the fake SGLang's answers do not depend on the weights it holds
        assert _ids(updated) != _ids(first), "degenerate test: the weight change did not change the answers"
    engine.release_memory()
    engine.resume_memory()
    assert _ids(engine.generate(PROMPTS, greedy)) == _ids(updated)
