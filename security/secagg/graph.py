"""The neighbour graph: complete (SecAgg) or a random k-regular graph (SecAgg+, Bell et al. 2020).

The sparse graph is a Harary-style ring over a random permutation of the clients: place clients 1..n on a
circle in a pseudorandom order and connect each to the k/2 nearest on either side. The permutation sorts the
clients by 64-bit keys expanded from the round id with HKDF + AES-CTR (public randomness: every party
computes the same graph without any message), never from numpy's Mersenne Twister. Neighbourhoods are
computed lazily, so a client pays O(n) for the permutation and O(k) for its own neighbours.
"""

from __future__ import annotations

import numpy as np

from fedfer.security.crypto import Keystream, hkdf_sha256
from fedfer.security.errors import ValidationError
from fedfer.security.secagg.params import SecAggParams

__all__ = ["NeighbourGraph"]

_GRAPH_INFO = b"fedfer/secagg/v1/neighbour-graph"


class NeighbourGraph:
    """Who masks with whom and who holds whose shares in one round.

    Args:
        params: the round parameters (n, degree and round id).
    """

    __slots__ = ("_complete", "_everyone", "_half", "_holders", "_n", "_neighbors", "_order", "_position")

    def __init__(self, params: SecAggParams) -> None:
        if not isinstance(params, SecAggParams):
            raise ValidationError("params must be SecAggParams")
        n = params.num_clients
        self._n = n
        self._complete = params.complete_graph
        self._half = params.neighbors // 2
        self._neighbors: dict[int, frozenset[int]] = {}
        self._holders: dict[int, frozenset[int]] = {}
        self._everyone = frozenset(range(1, n + 1))
        self._order: list[int] = []
        self._position: dict[int, int] = {}
        if not self._complete:
            seed = hkdf_sha256(params.round_id, info=_GRAPH_INFO, salt=params.digest)
            sort_keys = np.frombuffer(Keystream(nbytes=8 * n).generate(seed), dtype="<u8", count=n)
            # A stable sort makes ties (probability ~n^2 / 2^65) deterministic too.
            self._order = [int(i) + 1 for i in np.argsort(sort_keys, kind="stable")]
            self._position = {u: pos for pos, u in enumerate(self._order)}

    @property
    def num_clients(self) -> int:
        """n."""
        return self._n

    @property
    def complete(self) -> bool:
        """True for the complete graph."""
        return self._complete

    def neighbors(self, client_id: int) -> frozenset[int]:
        """The clients ``client_id`` masks with (excluding itself)."""
        cached = self._neighbors.get(client_id)
        if cached is not None:
            return cached
        if type(client_id) is not int or not 1 <= client_id <= self._n:
            raise ValidationError("unknown client id")
        if self._complete:
            out = self._everyone - {client_id}
        else:
            pos, n, order = self._position[client_id], self._n, self._order
            out = frozenset(order[(pos + d) % n] for d in range(-self._half, self._half + 1) if d != 0)
        self._neighbors[client_id] = out
        return out

    def holders(self, client_id: int) -> frozenset[int]:
        """The clients holding shares of ``client_id``'s secrets: its neighbours and itself."""
        cached = self._holders.get(client_id)
        if cached is None:
            if self._complete:
                if type(client_id) is not int or client_id not in self._everyone:
                    raise ValidationError("unknown client id")
                cached = self._everyone
            else:
                cached = self.neighbors(client_id) | {client_id}
            self._holders[client_id] = cached
        return cached
