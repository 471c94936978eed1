"""Regenerate every committed test fixture under tests/fixtures/.

Run: /work/venv/bin/python tools/make_fixtures.py
Each generator is deterministic (fixed seeds), so running this twice gives identical files.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import quantize  # noqa: E402
from fixtures import broken, gan, pipelines, quantized, randn, schedulers, tokenizer  # noqa: E402


def main() -> None:
    out_dir = ROOT / "tests" / "fixtures"
    tokenizer.main(out_dir)
    randn.main(out_dir / "randn")
    schedulers.main(out_dir / "schedulers")
    broken.main(out_dir)
    # Diffusion and GAN bundles with their references; they copy the tokenizer written above.
    pipelines.main(out_dir)
    gan.main(out_dir)
    # Quantized variants of some of the graphs written above, with onnxruntime's outputs.
    quantized.main(out_dir)
    default_model = pipelines.make_default_model(ROOT / "models", out_dir / "tokenizer")
    # The shipped int8 variant of the default model: tools/quantize.py's defaults (QDQ, calibrated).
    quantize.main([str(default_model), str(default_model.parent / f"{default_model.name}-int8")])


if __name__ == "__main__":
    main()
