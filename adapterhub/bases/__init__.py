"""Base model sources (shipped MiniLM, SmolLM2, local folders), shapes and fingerprints."""
