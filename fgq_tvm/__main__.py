"""``python -m fgq_tvm``: the ``fgq-tvm`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
