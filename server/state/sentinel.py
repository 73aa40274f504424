"""Finding the master through Sentinel: every sentinel asked, the newest configuration believed.

redis-py's Sentinel client takes the first sentinel that names a master it does not see as down. Right
after a failover that can be a sentinel that has not heard of it yet. When the old master comes back
meanwhile (restarted by an operator or a supervisor, answering as a master, or soon as a replica a little
behind), such a sentinel names it, and the server reads slots from it: answers that contradict the state
(invariants 8 and 9, docs/invariants.md). Measured on loopback with three sentinels, the old master
restarted as soon as one sentinel named the promoted replica: in one of three trials a sentinel named
the old master, no longer down, for 0.11 s while the two others named the promoted replica, and the old
master answered as a master (empty) for more than 6 s.

So every sentinel is asked at once, and the master is the address named with the highest configuration
epoch (a failover raises it, so a sentinel that missed one names an older epoch), then by the most
sentinels. Sentinels that see the master they name as down, or that are leading a failover (their own
view switches only at its end), do not count. Nothing named: MasterNotFoundError, which the store retries
until the chunk's deadline like any connection error. Asking all of them costs one round trip, at once;
a sentinel that does not answer at all holds a new connection up to the connect timeout.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

Address = tuple[str, int]


class NewestConfigSentinel(Sentinel):
    """redis-py's asyncio Sentinel whose `discover_master` goes by every sentinel's answer (above)."""

    async def discover_master(self, service_name: str) -> Address:
        answers = await asyncio.gather(*(self._named_master(s, service_name) for s in self.sentinels))
        votes: Counter[Address] = Counter()
        epochs: dict[Address, int] = {}
        errors: list[str] = []
        for answer in answers:
            if isinstance(answer, str):
                errors.append(answer)
            elif answer is not None:
                address, epoch = answer
                votes[address] += 1
                epochs[address] = max(epoch, epochs.get(address, epoch))
        if not votes:
            detail = f": {', '.join(errors)}" if errors else ""
            raise MasterNotFoundError(f"No master found for {service_name!r}{detail}")
        return max(votes, key=lambda address: (epochs[address], votes[address]))

    async def _named_master(self, sentinel: Redis, service_name: str) -> tuple[Address, int] | str | None:
        """(address, configuration epoch) this sentinel names; None: none it vouches for; str: it failed."""
        try:
            state: dict[str, Any] = await sentinel.sentinel_master(service_name)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            return f"{sentinel} - {exc!r}"
        except redis_errors.ResponseError:  # it does not monitor this name
            return None
        flags = state["flags"] if isinstance(state["flags"], set) else set(str(state["flags"]).split(","))
        if "failover_in_progress" in flags or not self.check_master_state(state, service_name):
            return None
        host = self._force_master_ip if self._force_master_ip is not None else state["ip"]
        return (host, int(state["port"])), int(state.get("config-epoch", 0))
