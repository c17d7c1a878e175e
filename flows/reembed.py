"""Scheduled re-embedding: new and changed catalog items -> frozen-LLM vectors -> the served item tower
-> a new index version, published by moving the retriever's alias (no retraining).

    python flows/reembed.py --config conf/default.yaml data.path=<catalog snapshot> [reembed.alias=champion]
    ray job submit --working-dir . -- python flows/reembed.py --config conf/scientific.yaml data.path=<dir>
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from learn.cli import reembed_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(reembed_main(sys.argv[1:]))
