"""Write a tiny random-weight checkpoint of a supported family.

    python scripts/make_tiny_model.py --family llama --out DIR [--layers N] [--hidden H] [--seed S]
"""

import argparse

from swarmtune.models.registry import supported_model_types
from swarmtune.tiny_model import make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", required=True, choices=supported_model_types())
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_model(args.family, args.out, args.layers, args.hidden, args.seed))


if __name__ == "__main__":
    main()
