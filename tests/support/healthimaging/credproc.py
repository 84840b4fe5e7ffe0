"""A ``credential_process`` for botocore: prints session credentials the emulator accepts.

    credential_process = python3 /abs/tests/support/healthimaging/credproc.py MASTER_HEX TTL [COUNT_FILE]

Each run issues new credentials valid for TTL seconds (derived from the emulator's
master secret, see `identity`) and, when COUNT_FILE is given, appends a line to it
so a test can tell how often botocore refreshed. Runs as a plain script (botocore
spawns it), so it imports its sibling module by path, without the test package.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from identity import session_credentials


def main(argv: list[str]) -> int:
    master, ttl = bytes.fromhex(argv[1]), float(argv[2])
    credentials = session_credentials(master, ttl)
    if len(argv) > 3:
        with open(argv[3], "a", encoding="ascii") as fh:
            fh.write(credentials["AccessKeyId"] + "\n")
    print(json.dumps(credentials))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
