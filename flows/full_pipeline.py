"""The whole LEARN pipeline: data -> frozen-LLM item embeddings -> twin towers -> full-ranking
evaluation, logged to MLflow.

    python flows/full_pipeline.py --config conf/default.yaml [key=value ...]
    ray job submit --working-dir . -- python flows/full_pipeline.py --config conf/default.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from learn.cli import pipeline_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pipeline_main(sys.argv[1:]))
