"""``python -m ogpsa.optim.bench [ARGS]``: the projected-AdamW benchmark, now one suite of
``ogpsa bench`` (:mod:`ogpsa.bench.adamw`). Same as ``ogpsa bench --suite adamw [ARGS]``
(``--workloads lora 125m tiny``, ``--ks``, ``--contenders``, ``--budget-s``, ``--repeats``,
``--out`` / ``--publish``); kept so that the old command still runs."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ogpsa bench --suite adamw`` with ``argv`` (default: the command line)."""
    from ogpsa.cli import main as cli_main

    return cli_main(["bench", "--suite", "adamw", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
