"""Which FP8 recipe TE can train SmolLM2's GEMMs with on this GPU: prints ``blockwise`` or ``tensorwise``.

Blockwise scaling (TE ``Float8BlockScaling``, megatron-core ``fp8_recipe="blockwise"``) quantizes in 128-wide
tiles and SmolLM2-135M's hidden size is 576 (4.5 x 128); whether TE takes that depends on its version and the
GPU, so the e2e job (tools/device/e2e.sh) asks TE itself with the model's own shapes (hidden 576, MLP 1536, a
micro-batch of 512 tokens, forward + backward) before it spends minutes on the FP8 run. Falls back to per-tensor
current scaling (``Float8CurrentScaling``), whose GEMM dims only need to be multiples of 16. Why it fell back goes
to stderr (docs/perf/e2e.md quotes it).
"""

from __future__ import annotations

import sys


def trains(recipe_name: str, hidden: int = 576, ffn: int = 1536, tokens: int = 512) -> str | None:
    """None if one forward + backward of the model's two MLP GEMMs runs under the recipe, else the error."""
    try:
        import torch
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe

        make = {"blockwise": recipe.Float8BlockScaling, "tensorwise": recipe.Float8CurrentScaling}[recipe_name]
        up = te.Linear(hidden, ffn, bias=False, params_dtype=torch.bfloat16, device="cuda")
        down = te.Linear(ffn, hidden, bias=False, params_dtype=torch.bfloat16, device="cuda")
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with te.fp8_autocast(enabled=True, fp8_recipe=make()):
            y = down(torch.nn.functional.silu(up(x)))
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        if not torch.isfinite(x.grad).all():
            return "non-finite input gradient"
    except Exception as exc:  # noqa: BLE001 - any TE refusal means: use the other recipe
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None


def main() -> None:
    for name in ("blockwise", "tensorwise"):
        error = trains(name)
        if error is None:
            print(name)
            return
        print(f"fp8_probe: {name} refused for SmolLM2's shapes: {error}", file=sys.stderr)
    print("fp8_probe: no FP8 recipe trains here; the FP8 stage will fail and say why", file=sys.stderr)
    print("blockwise")


if __name__ == "__main__":
    main()
