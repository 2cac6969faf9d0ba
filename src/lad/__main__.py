"""``python -m lad`` is the same program as the ``lad`` console script (torchrun launches it)."""

from lad.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
