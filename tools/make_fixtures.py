"""Regenerate every committed test fixture under tests/fixtures/.

Run: /work/venv/bin/python tools/make_fixtures.py
Each generator is deterministic (fixed seeds), so running this twice gives identical files.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from fixtures import gan, pipelines, tokenizer  # noqa: E402


def main() -> None:
    out_dir = ROOT / "tests" / "fixtures"
    tokenizer.main(out_dir)
    # Diffusion and GAN bundles with their references; they copy the tokenizer written above.
    pipelines.main(out_dir)
    gan.main(out_dir)
    pipelines.make_default_model(ROOT / "models", out_dir / "tokenizer")


if __name__ == "__main__":
    main()
