"""`lstm-serve admin ...`: operator steps that act on the deployment's Redis, not on one server.

    lstm-serve admin record-format [--redis-url ... and the other Redis flags]       # show it
    lstm-serve admin record-format 3 [--redis-url ...]                              # allow format 3

`record-format N` sets the newest slot-record format the replicas may write (server/state/formats.py):
run it with N = 3 once every replica runs this release (the answers of the last `--replay-window` chunks
are then kept), or with N = 2 before rolling back to 0.1.0. Replicas pick it up within
formats.REFRESH_S. The Redis flags and environment are `lstm-serve`'s own (the URL, Sentinel, Cluster,
`--key-prefix`), so the command reaches the Redis the replicas use.
"""

from __future__ import annotations

import asyncio
import sys

from server.config import load_config
from server.errors import EXIT_STARTUP_ERROR, StartupError
from server.security.redact import scrub
from server.state.connection import RedisTopology, connect
from server.state.formats import REDIS_ERRORS, REFRESH_S, WRITABLE_FORMATS, FormatKeyError, RecordFormat, parse_format
from server.state.record import READ_FORMATS

USAGE = ("usage: lstm-serve admin record-format [N] [REDIS FLAGS]\n"
         f"  N: the newest record format replicas may write, one of {', '.join(map(str, WRITABLE_FORMATS))}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "record-format":
        print(USAGE, file=sys.stderr)
        return EXIT_STARTUP_ERROR
    wanted: int | None = None
    rest = argv[1:]
    if rest and rest[0].isdigit():
        wanted = int(rest[0])
        rest = rest[1:]
        if wanted not in WRITABLE_FORMATS:
            print(f"record format {wanted} is not one this release writes; {USAGE}", file=sys.stderr)
            return EXIT_STARTUP_ERROR
    config = load_config(rest)
    topology = RedisTopology.from_config(config)
    try:
        return asyncio.run(_record_format(topology, config.key_prefix, wanted))
    except StartupError as exc:  # a URL that cannot be used, said without its password
        print(exc.log_line(), file=sys.stderr)
        return EXIT_STARTUP_ERROR
    except REDIS_ERRORS as exc:
        print(f"cannot reach Redis at {topology.describe()}: {scrub(str(exc), config.redis_url)}", file=sys.stderr)
        return EXIT_STARTUP_ERROR


async def _record_format(topology: RedisTopology, key_prefix: str, wanted: int | None) -> int:
    client = connect(topology)
    try:
        key = RecordFormat(client, key_prefix).key
        if wanted is not None:
            await client.set(key, wanted)
            print(f"record format {wanted} allowed ({key} in {topology.describe()}); every replica writes it "
                  f"within {REFRESH_S:g} s")
            return 0
        try:
            found = parse_format(await client.get(key))
        except FormatKeyError as exc:
            print(f"{exc}; set it again with `lstm-serve admin record-format N`", file=sys.stderr)
            return EXIT_STARTUP_ERROR
        shown = "not set (replicas decide at start-up: docs/deploy.md, \"Rolling upgrades\")" if found is None \
            else str(found)
        print(f"record format: {shown}; this release reads formats {', '.join(map(str, READ_FORMATS))} and "
              f"writes {', '.join(map(str, WRITABLE_FORMATS))}")
        return 0
    finally:
        await client.aclose()
