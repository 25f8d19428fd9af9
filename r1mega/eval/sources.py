"""What one ``r1mega-eval`` process evaluates: one model, or several in turn on one engine (``eval.models``).

Several checkpoints of one architecture (the cold start, the RL runs' finals, a baseline's saved model) share the
process's imports, the model build and the rollout engine's start-up (SGLang: its CUDA-graph capture): after the
first, each one's weights are loaded into the same megatron model and pushed to the engine as a training step's
update is. On the H200 that start-up was ~150 s of a 264 s evaluation (docs/perf/e2e.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from r1mega.config import ConfigError, ModelConfig

# ModelConfig fields that name a source, not an architecture: they may differ between the models of one process
_SOURCE_FIELDS = {"name", "hf_path", "checkpoint", "tokenizer"}


@dataclass(frozen=True)
class EvalModel:
    """One model to evaluate: its label, where its weights are, where its results go."""

    label: str  # "" for the single model of a plain r1mega-eval
    path: str
    output: str  # the per-problem results JSON
    is_hf: bool  # an HF folder, else a megatron checkpoint (r1mega-train's step_N or save_model's directory)


_LABEL = re.compile(r"^([A-Za-z0-9_.-]+):(.+)$")


def parse_entry(entry: str) -> tuple[str, str]:
    """``"cold:runs/cold_hf"`` -> ("cold", "runs/cold_hf"); a bare path is labelled by its folder's name."""
    m = _LABEL.match(entry)
    return (m.group(1), m.group(2)) if m else (Path(entry).name, entry)


def eval_models(user_model: ModelConfig, entries: list[str], output: str) -> list[EvalModel]:
    """The models of this process, in order. ``entries`` (``eval.models``) empty: ``model.checkpoint`` or
    ``model.hf_path`` alone, its results at ``output``; else each label's at ``<output's folder>/<label>/<name>``."""
    out = Path(output)
    if not entries:
        if not (user_model.checkpoint or user_model.hf_path):
            raise ConfigError(
                "nothing to evaluate: set model.checkpoint=<megatron checkpoint dir> or model.hf_path=<HF model "
                "folder> (or eval.models=[LABEL:PATH,...])"
            )
        # a megatron checkpoint wins over hf_path (which then gives only the architecture), as in r1mega-train
        ckpt = user_model.checkpoint
        return [EvalModel("", str(ckpt or user_model.hf_path), output, is_hf=not ckpt)]
    found: list[EvalModel] = []
    for label, path in map(parse_entry, entries):
        if not label or label in (".", "..") or any(f.label == label for f in found):
            raise ConfigError(f"eval.models: label {label!r} is empty or used twice; write LABEL:PATH")
        if not Path(path).is_dir():
            raise ConfigError(f"eval.models.{label}={path}: no such folder (an HF model folder or a checkpoint)")
        is_hf = (Path(path) / "config.json").is_file()  # a megatron checkpoint has metadata.json, no config.json
        found.append(EvalModel(label, str(path), str(out.parent / label / out.name), is_hf))
    return found


def architecture_config(user_model: ModelConfig, models: list[EvalModel]) -> ModelConfig:
    """The ModelConfig every model must share: the user's ``model.*`` (with ``model.hf_path``, or else the first HF
    entry, giving the architecture), checked against every other HF entry's config.json before anything loads."""
    from r1mega.model.hf_load import resolve_model_config

    base = user_model
    first_hf = next((m for m in models if m.is_hf), None)
    if not (base.hf_path or base.checkpoint) and first_hf is not None:
        base = dataclasses.replace(base, hf_path=first_hf.path)
    resolved = resolve_model_config(base)
    if len(models) > 1:
        want = _architecture(resolved)
        for m in models:
            if not m.is_hf:
                continue  # a megatron checkpoint is checked against the built model (check_compatible)
            got = _architecture(resolve_model_config(dataclasses.replace(user_model, hf_path=m.path)))
            diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
            if diff:
                raise ConfigError(
                    f"eval.models.{m.label}={m.path}: another architecture than {resolved.hf_path or 'model.*'} "
                    f"(field: first, this one): {diff}; evaluate it in its own r1mega-eval process"
                )
            _check_same_vocab(resolved.tokenizer, m)
    return resolved


def _architecture(m: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(m).items() if k not in _SOURCE_FIELDS}


def _vocab(folder: str | None) -> dict | None:
    """tokenizer.json's token -> id map and added tokens (what encoding depends on), or None without one."""
    f = Path(folder or "") / "tokenizer.json"
    if not folder or not f.is_file():
        return None
    tok = json.loads(f.read_text())
    added = [(t["id"], t["content"]) for t in tok.get("added_tokens", [])]
    return {"vocab": (tok.get("model") or {}).get("vocab"), "added": added}


def _check_same_vocab(tokenizer: str | None, m: EvalModel) -> None:
    """All models are prompted and decoded with one tokenizer: refuse an HF entry whose vocabulary differs."""
    mine, theirs = _vocab(tokenizer), _vocab(m.path)
    if mine is not None and theirs is not None and mine != theirs:
        raise ConfigError(
            f"eval.models.{m.label}={m.path}: its tokenizer.json has another vocabulary than {tokenizer}'s, which "
            "encodes every model's prompts here; evaluate it in its own r1mega-eval process"
        )


def load_weights(policy, cfg, model: EvalModel) -> None:
    """``model``'s weights into the built policy (collective: every rank calls it), as r1mega-train loads them."""
    from r1mega.checkpoint import load_model
    from r1mega.model.hf_load import load_hf_weights

    if model.is_hf:
        load_hf_weights(policy.model, cfg.model, hf_path=model.path)
    else:
        load_model(policy.model, model.path)
    policy.optimizer.reload_model_params()  # bf16: the optimizer's fp32 main copies follow the model
