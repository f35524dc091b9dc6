"""`python -m llmkit ...` is the same as `llmkit ...` (and what torchrun / accelerate launch run)."""

from llmkit.cli import main

if __name__ == "__main__":
    main()
