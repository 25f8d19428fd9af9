"""megatron model -> a Hugging Face folder that ``transformers`` loads as is (``r1mega-export``, and
``train.export_hf_dir`` at the end of / during a run).

    r1mega-export OUT_DIR model.hf_path=/path/to/hf_dir model.checkpoint=runs/x/ckpt/step_000010
    torchrun --nproc_per_node 2 -m r1mega.model.hf_io OUT_DIR parallel.tp=2 model.hf_path=... model.checkpoint=...

The folder holds sharded safetensors (``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``),
``config.json`` (:func:`~r1mega.model.hf_export.hf_config_from_model_config`), the source folder's
``generation_config.json`` and the tokenizer with its chat template. The weights are streamed: one bucket of
:func:`~r1mega.model.hf_export.iter_hf_buckets` at a time is written as one file, so no rank holds more than one
shard file of tensors. Collective: every rank calls :func:`save_hf_folder`; in each pipeline stage the rank
with data-parallel and tensor-parallel rank 0 writes that stage's files (TP / EP gathered by the export).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.config import ModelConfig
from r1mega.model.hf_export import hf_config_from_model_config, iter_hf_buckets

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _ranks() -> tuple[int, int, bool]:
    """(global rank, pipeline stage, whether this rank writes its stage's files)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 0, True
    from megatron.core import parallel_state as ps

    writer = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    return dist.get_rank(), ps.get_pipeline_model_parallel_rank(), writer


def save_hf_folder(
    model,
    m: ModelConfig,
    vocab_size: int,
    out: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 << 30,
    tokenizer: Optional[str] = None,
) -> Path:
    """Write ``model`` (this rank's part of it) as a HF folder at ``out``; returns the folder."""
    out = Path(out)
    rank, stage, writer = _ranks()
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    weight_map: dict[str, str] = {}
    total = 0
    for i, bucket in enumerate(iter_hf_buckets(model, m, vocab_size, shard_bytes, dtype)):
        if writer:
            from safetensors.torch import save_file

            name = f"part-{stage:03d}-{i:05d}.safetensors"
            save_file({n: t.detach().contiguous().cpu() for n, t in bucket}, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({n: name for n, _ in bucket})
            total += sum(t.numel() * t.element_size() for _, t in bucket)
        del bucket
    maps: list = [(weight_map, total)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        maps = [None] * dist.get_world_size()
        dist.all_gather_object(maps, (weight_map, total))
    if rank == 0:
        _finish(tmp, maps, m, vocab_size, dtype, tokenizer)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out


def _finish(tmp: Path, maps: list, m: ModelConfig, vocab_size: int, dtype: torch.dtype, tokenizer) -> None:
    """Rename the parts to HF's model-XXXXX-of-YYYYY names, write the index, config, tokenizer."""
    parts = sorted({f for wm, _ in maps for f in wm.values()})
    names = {p: f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i, p in enumerate(parts)}
    for p, n in names.items():
        os.replace(tmp / p, tmp / n)
    weight_map = {t: names[f] for wm, _ in maps for t, f in wm.items()}
    index = {"metadata": {"total_size": sum(s for _, s in maps)}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    src = json.loads((Path(m.hf_path) / "config.json").read_text()) if m.hf_path else {}
    ids = {k: src[k] for k in ("bos_token_id", "eos_token_id") if isinstance(src.get(k), int)}
    hf = hf_config_from_model_config(m, vocab_size, dtype=_DTYPES[dtype], **ids)
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    if m.hf_path and (Path(m.hf_path) / "generation_config.json").is_file():
        shutil.copy(Path(m.hf_path) / "generation_config.json", tmp / "generation_config.json")
    tok = tokenizer or (m.tokenizer if m.tokenizer != "char" else None)
    for f in _TOKENIZER_FILES if tok else ():  # copied as they are: the chat template and eos stay the source's
        if (Path(tok) / f).is_file():
            shutil.copy(Path(tok) / f, tmp / f)


def maybe_export_hf(cfg, policy, step: Optional[int]) -> Optional[Path]:
    """The trainer's hook: at the end of the run (``step`` None) into ``train.export_hf_dir``, and every
    ``train.export_hf_every`` steps into the sibling ``<export_hf_dir>-step_N``. Collective."""
    t = cfg.train
    if not t.export_hf_dir or (step is not None and not (t.export_hf_every and step % t.export_hf_every == 0)):
        return None
    out = Path(t.export_hf_dir) if step is None else Path(f"{t.export_hf_dir}-step_{step:06d}")
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    return save_hf_folder(policy.model, cfg.model, policy.vocab_size, out, dtype=dtype)


# ============================================================================================ CLI


def main(argv: Optional[list[str]] = None) -> None:
    """``r1mega-export OUT_DIR [hydra overrides]``: build the model of the config, load ``model.hf_path`` and then
    ``model.checkpoint`` (a megatron checkpoint of a run), and write the HF folder."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.checkpoint import load_model
    from r1mega.config import register_configs
    from r1mega.data.tokenizer import build_tokenizer
    from r1mega.model.builder import build_gpt_model
    from r1mega.model.hf_load import load_hf_weights, resolve_model_config
    from r1mega.parallel.runtime import init_runtime, shutdown_runtime
    from r1mega.train import CONF_DIR, _quiet

    _quiet()
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=argv[1:]))
    runtime = init_runtime(cfg.parallel, cfg.train.seed, cfg.train.device, cfg.train.threads)
    m = resolve_model_config(cfg.model)
    vocab = m.vocab_size or build_tokenizer(m.tokenizer).vocab_size
    model = build_gpt_model(m, cfg.parallel, cfg.train, vocab, runtime.device)
    if m.hf_path:
        load_hf_weights(model, m)
    if m.checkpoint:
        load_model(model, m.checkpoint)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    out = save_hf_folder(model, m, vocab, argv[0], dtype=dtype)
    if runtime.is_main:
        print(f"wrote {out}")
    shutdown_runtime()


if __name__ == "__main__":
    main()
