"""A test double for `python -m selfalign.stages`: same arguments, same result contract, no model.

It reads the spec the Job mounted (so a missing ConfigMap or a wrong path fails like the real
stage would), writes a realistic summary to $SELFALIGN_RESULT_PATH and exits 0. When the stage's
name is in $FAKE_FAIL (comma-separated), it fails instead: {"error": ...} and exit code 1, the
cause as the last log line. $FAKE_FAIL_CODE picks another exit code (2: bad input).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SUMMARIES = {
    "synthesize": lambda r: {"generated": 12 + r, "instructions": 10 + r},
    "assess": lambda r: {"scored": 10 + r, "kept": 7 + r},
    "train": lambda r: {"loss": round(1.5 / (r + 1), 3), "steps": 4},
    "merge": lambda r: {"maxLogitDiff": 0.0001},
    "coverage": lambda r: {"coverage": round(0.42 + 0.1 * r, 2), "gaps": 3},
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(SUMMARIES))
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--round", required=True, type=int)
    parser.add_argument("--run-uri", required=True)
    parser.add_argument("--model")
    parser.add_argument("--scratch")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    result_path = Path(os.environ["SELFALIGN_RESULT_PATH"])
    print(f"fake {args.stage} round={args.round} recipe={spec['recipe']} run={args.run_uri}", flush=True)
    if args.stage in os.environ.get("FAKE_FAIL", "").split(","):
        cause = f"{args.stage} round {args.round}: fake failure for the test"
        result_path.write_text(json.dumps({"error": cause}))
        print(f"error: {cause}", file=sys.stderr, flush=True)
        return int(os.environ.get("FAKE_FAIL_CODE", "1"))
    result_path.write_text(json.dumps(SUMMARIES[args.stage](args.round)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
