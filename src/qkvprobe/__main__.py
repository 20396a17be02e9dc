"""``python -m qkvprobe`` (also the entry point torchrun uses)."""

from .cli import main

if __name__ == "__main__":
    main()
