"""``python -m ml_mamba.training`` = ``ml-mamba-train``."""

from .train import main

if __name__ == "__main__":
    main()
