"""A/B comparison of two logged retrievers (run ids or models:/ URIs) on the same split and users.

    python flows/compare.py <run or model A> <run or model B> [--promote]
    python flows/compare.py models:/learn-retriever@champion models:/learn-retriever@challenger --promote
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from learn.cli import compare_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(compare_main(sys.argv[1:]))
