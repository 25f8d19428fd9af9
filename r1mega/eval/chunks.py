"""The finished chunks of an evaluation on disk, so a stopped ``r1mega-eval`` goes on where it stopped.

A k = 16 pass over GSM8K + MATH-500 is tens of minutes of generation on one GPU: a time limit, a preemption or a
crash in the last set must not cost the sets before it. After every chunk (one engine call, ``eval.chunk_problems``
problems x k samples) each rank appends that chunk's scored samples to its own JSONL file
(``<eval.json stem>_chunks.rank<R>.jsonl``), flushed and fsynced. A rerun of the same evaluation (``eval.resume``,
on by default) reads them back and generates only the chunks that are missing. Each chunk samples with the seed
``eval.seed + chunk``, so the results equal a run that was never stopped wherever the engine honours seeds (the
megatron engine; SGLang only with ``rollout.deterministic=true``, sglang 0.5.17 reads ``sampling_seed`` nowhere
else). "The same evaluation" is a fingerprint of the settings, the model, the engine and the problems of the rank:
anything else starts over. The files go once ``eval.json`` is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class Sample:
    """One scored answer: what the results keep of a rollout (the token ids are not needed after scoring)."""

    answer: Optional[str]
    accuracy: float
    format: float
    length: int
    finished: bool
    text: Optional[str]  # the response, only with eval.save_responses


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able parts (settings, model identity, the rank's problems)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_path(results_path: str | Path, rank: int) -> Path:
    p = Path(results_path)
    return p.with_name(f"{p.stem}_chunks.rank{rank}.jsonl")


class ChunkStore:
    """Append-only chunk records of one rank, tagged with the evaluation's fingerprint."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key

    def load(self) -> list[tuple[list[Sample], float]]:
        """The finished chunks 0, 1, ... in order (samples, generation seconds): the leading run of chunks of this
        evaluation. A torn last line (killed mid-write) or a file of another evaluation counts as not finished."""
        out: list[tuple[list[Sample], float]] = []
        if not self.path.is_file():
            return out
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("key") != self.key or rec.get("chunk") != len(out):
                break
            out.append(([Sample(*s) for s in rec["samples"]], float(rec["gen_s"])))
        return out

    def reset(self, keep: list[tuple[list[Sample], float]]) -> None:
        """Rewrite the file with only ``keep`` (drops a torn tail or another evaluation's chunks)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for c, (samples, gen_s) in enumerate(keep):
                f.write(self._line(c, samples, gen_s))
        os.replace(tmp, self.path)

    def append(self, chunk: int, samples: list[Sample], gen_s: float) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(self._line(chunk, samples, gen_s))
            f.flush()
            os.fsync(f.fileno())

    def _line(self, chunk: int, samples: list[Sample], gen_s: float) -> str:
        rec = {"key": self.key, "chunk": chunk, "gen_s": gen_s, "samples": [list(astuple(s)) for s in samples]}
        return json.dumps(rec, ensure_ascii=False) + "\n"
