"""Moving the aliases of a registered model (``champion``, ``previous``) crash-safely, for promotion and rollback.

Moving two aliases takes several registry calls, and a process can die between any two. `move_champion` first
writes the demoted champion to a transient alias ``demoting``; then ``champion`` moves (one call, so a reader never
sees a product without a champion), then ``previous``, then ``demoting`` goes. `repair_aliases`, which the next
promote or rollback of the product calls first, finds a leftover ``demoting`` and finishes the move: ``previous``
<- ``demoting`` when ``champion`` has moved off it, then ``demoting`` is deleted. So after a crash at any point the
aliases are either as before or as after the move, never with ``champion`` == ``previous`` and the demoted version
forgotten (tests/platform/test_promotion.py kills the process after each write).

Limit: two moves of one product must not run at the same time; the registry has no compare-and-set on aliases, so
concurrent moves can interleave their writes (`ssn_platform.promotion` checks only that the champion did not move
while it evaluated).
"""

from __future__ import annotations

import logging

from ssn_platform.names import CHAMPION, DEMOTING, PREVIOUS

log = logging.getLogger(__name__)


def read_aliases(client, name: str) -> dict[str, str]:
    """The registered model's aliases: {alias: version}."""
    return {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}


def repair_aliases(client, name: str) -> str | None:
    """Finishes an alias move a crash interrupted (a leftover ``demoting`` alias); returns what it did, or None."""
    aliases = read_aliases(client, name)
    demoting = aliases.get(DEMOTING)
    if demoting is None:
        return None
    done = "nothing had moved"
    if aliases.get(CHAMPION) != demoting:
        client.set_registered_model_alias(name, PREVIOUS, demoting)
        done = f"champion v{aliases.get(CHAMPION)}, previous v{demoting}"
    client.delete_registered_model_alias(name, DEMOTING)
    log.warning("%s: finished an interrupted alias move (%s)", name, done)
    return done


def move_champion(client, name: str, new: str, old: str | None) -> None:
    """``champion`` <- `new`, ``previous`` <- `old` (when there was a champion), crash-safe through ``demoting``."""
    if old is None:
        client.set_registered_model_alias(name, CHAMPION, new)
        return
    client.set_registered_model_alias(name, DEMOTING, old)
    client.set_registered_model_alias(name, CHAMPION, new)  # the one call that switches serving
    client.set_registered_model_alias(name, PREVIOUS, old)
    client.delete_registered_model_alias(name, DEMOTING)
