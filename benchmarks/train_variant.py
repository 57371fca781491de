"""train_omni.py with one of benchmarks/step_variants.py's candidate changes to the step in place: what a candidate
makes of whole iterations, end to end (sampling, logging and checkpoints included), before it is built in.

    python benchmarks/train_variant.py VARIANT [train_omni.py flags]

tools/gpu.sh's `best` step times it so with the candidate that replayed fastest in its `variants` step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import step_variants  # noqa: E402
import train_omni  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=step_variants.VARIANTS, metavar="VARIANT",
                   help=f"one of: {', '.join(step_variants.VARIANTS)}")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="train_omni.py's flags")
    args = p.parse_args(argv)
    with step_variants.VARIANTS[args.variant]():
        train_omni.main(args.flags)


if __name__ == "__main__":
    main()
