"""Model architectures: `nef_gpt` (NefGPT)."""
