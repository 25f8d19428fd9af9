"""r1mega: DeepSeek-R1-Zero-style GRPO on megatron-core Mixture-of-Experts policies."""

__version__ = "0.1.0"
