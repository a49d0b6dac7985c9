"""Round parameters of secure aggregation, shared verbatim by the server and every client."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedfer.security.crypto import sha256
from fedfer.security.errors import ValidationError
from fedfer.security.quantize import FixedPointCodec
from fedfer.security.secagg._wire import MalformedMessageError, Reader, Writer

__all__ = ["MAX_CLIENTS", "SecAggParams", "default_neighbors", "default_threshold", "threshold_for_colluders"]

MAX_CLIENTS = 1 << 20
_KIND_PARAMS = 10
_ROUND_ID_MIN = 16
_ROUND_ID_MAX = 64


def default_neighbors(num_clients: int) -> int:
    """SecAgg+ default degree: the even number ``2 * ceil(1.5 * log2(n))``, or the complete graph if larger.

    Bell et al. (CCS 2020) show O(log n) neighbours suffice; this gives 20 for n=100 and 30 for n=1000.

    Args:
        num_clients: n >= 2.

    Returns:
        The degree k (``n - 1`` means the complete graph, i.e. classic SecAgg).
    """
    if type(num_clients) is not int or num_clients < 2:
        raise MalformedMessageError("num_clients must be an int >= 2")
    k = 2 * math.ceil(1.5 * math.log2(num_clients))
    return num_clients - 1 if k >= num_clients - 1 else k


def default_threshold(num_clients: int, neighbors: int) -> int:
    """Default Shamir threshold: a strict majority of each client's share holders (its neighbours and itself).

    A strict majority means that no two disjoint groups of holders can each reach t, so a server cannot
    collect both a client's self-mask seed and its mask key from honest holders.

    Args:
        num_clients: n.
        neighbors: degree k.

    Returns:
        ``(k + 1) // 2 + 1`` (for the complete graph ``n // 2 + 1``), at least 2.
    """
    holders = min(neighbors, num_clients - 1) + 1
    return max(2, holders // 2 + 1)


def threshold_for_colluders(num_clients: int, neighbors: int, colluders: int) -> int:
    """The smallest threshold that keeps a client's update private from a server that lies about dropouts
    while ``colluders`` of that client's share holders hand the server everything they hold.

    With ``h = neighbors + 1`` holders per client, the lie (telling some holders "u dropped" and others
    "u survived") yields both of u's secrets exactly when ``colluders >= 2t - h``; so
    ``t = floor((h + c) / 2) + 1`` is the least t that defeats it. Dropout tolerance falls accordingly
    (each client needs t live holders).

    Args:
        num_clients: n.
        neighbors: degree k.
        colluders: c >= 0, colluding holders per client to tolerate.

    Returns:
        t, at least 2.

    Raises:
        MalformedMessageError: if no threshold up to h tolerates that many colluders.
    """
    if type(colluders) is not int or colluders < 0:
        raise MalformedMessageError("colluders must be a non-negative int")
    holders = min(neighbors, num_clients - 1) + 1
    t = max(2, (holders + colluders) // 2 + 1)
    if t > holders:
        raise MalformedMessageError("no threshold tolerates that many colluders among the share holders")
    return t


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """Everything both sides of a round must agree on.

    Attributes:
        round_id: 16..64 unique, unpredictable bytes chosen by the server (also seeds the neighbour graph).
        num_clients: n, clients are numbered 1..n within the round.
        dim: length of each float update.
        neighbors: degree k of the neighbour graph; ``n - 1`` is the complete graph (SecAgg), an even
            2 <= k < n - 1 is a random k-regular graph (SecAgg+).
        threshold: Shamir threshold t, 2 <= t <= k + 1; the round needs t surviving holders per secret.
            Against an honest-but-curious server, t - 1 colluding holders learn nothing; against a server
            that lies to different holders about who dropped, only ``2t - (k + 1) - 1`` do (see
            :attr:`colluders_tolerated_by_lying_server` and :func:`threshold_for_colluders`).
        clip: updates are clipped coordinate-wise to [-clip, clip].
        max_weight: the largest integer weight (example count) a client may upload.
        modulus_bits: k_bits, arithmetic is mod 2^k_bits (<= 32 packs 4 bytes per element or fewer).
    """

    round_id: bytes
    num_clients: int
    dim: int
    neighbors: int
    threshold: int
    clip: float = 1.0
    max_weight: int = 1
    modulus_bits: int = 32
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.round_id) is not bytes or not _ROUND_ID_MIN <= len(self.round_id) <= _ROUND_ID_MAX:
            raise MalformedMessageError(f"round_id must be {_ROUND_ID_MIN}..{_ROUND_ID_MAX} bytes")
        n = self.num_clients
        if type(n) is not int or not 2 <= n <= MAX_CLIENTS:
            raise MalformedMessageError(f"num_clients must be an int in 2..{MAX_CLIENTS}")
        if type(self.dim) is not int or not 1 <= self.dim < (1 << 31):
            raise MalformedMessageError("dim must be a positive int")
        k = self.neighbors
        if type(k) is not int or not 1 <= k <= n - 1:
            raise MalformedMessageError("neighbors must be an int in 1..num_clients-1")
        if k < n - 1 and (k % 2 != 0 or k < 2):
            raise MalformedMessageError("a sparse (SecAgg+) neighbour graph needs an even degree >= 2")
        t = self.threshold
        if type(t) is not int or not 2 <= t <= k + 1:
            raise MalformedMessageError("threshold must be an int in 2..neighbors+1")
        if type(self.clip) is not float or not math.isfinite(self.clip) or self.clip <= 0.0:
            raise MalformedMessageError("clip must be a finite positive float")
        if type(self.max_weight) is not int or self.max_weight < 1:
            raise MalformedMessageError("max_weight must be a positive int")
        if type(self.modulus_bits) is not int or not 8 <= self.modulus_bits <= 62:
            raise MalformedMessageError("modulus_bits must be an int in 8..62")
        try:
            self.codec()
        except ValidationError as exc:  # no fixed-point scale fits these bounds
            raise MalformedMessageError(str(exc)) from None
        object.__setattr__(self, "digest", sha256(self._encode_fields()))

    @classmethod
    def create(
        cls,
        *,
        round_id: bytes,
        num_clients: int,
        dim: int,
        neighbors: int | None = None,
        threshold: int | None = None,
        clip: float = 1.0,
        max_weight: int = 1,
        modulus_bits: int = 32,
    ) -> SecAggParams:
        """Build parameters, filling the SecAgg+ default degree and threshold when not given.

        Args:
            round_id: 16..64 random bytes (``os.urandom(32)`` on the server).
            num_clients: n.
            dim: update length.
            neighbors: degree; ``None`` = :func:`default_neighbors`.
            threshold: t; ``None`` = :func:`default_threshold`.
            clip: clipping bound c.
            max_weight: largest client weight W.
            modulus_bits: arithmetic modulus exponent.

        Returns:
            Validated parameters.
        """
        k = default_neighbors(num_clients) if neighbors is None else neighbors
        t = default_threshold(num_clients, k) if threshold is None else threshold
        return cls(
            round_id=round_id,
            num_clients=num_clients,
            dim=dim,
            neighbors=k,
            threshold=t,
            clip=clip,
            max_weight=max_weight,
            modulus_bits=modulus_bits,
        )

    @property
    def holders_per_client(self) -> int:
        """Share holders of each client's secrets: its k neighbours and itself."""
        return self.neighbors + 1

    @property
    def colluders_tolerated(self) -> int:
        """Colluding share holders an honest-but-curious server may add and still learn nothing: t - 1."""
        return self.threshold - 1

    @property
    def colluders_tolerated_by_lying_server(self) -> int:
        """Colluding holders tolerated by a server that also lies about dropouts: ``max(0, 2t - h - 1)``.

        Below this the holders a lie can win over cannot reach t for both of one client's secrets; at it the
        lie succeeds (``tests/privacy/test_server_view.py`` runs the attack on both sides of the bound).
        """
        return max(0, 2 * self.threshold - self.holders_per_client - 1)

    @property
    def complete_graph(self) -> bool:
        """True for classic SecAgg (every client is every other's neighbour)."""
        return self.neighbors == self.num_clients - 1

    @property
    def vector_length(self) -> int:
        """Elements in each masked vector: ``dim`` weighted coordinates plus the weight."""
        return self.dim + 1

    @property
    def bytes_per_element(self) -> int:
        """Whole bytes per element on the wire (``ceil(modulus_bits / 8)``)."""
        return (self.modulus_bits + 7) // 8

    def codec(self) -> FixedPointCodec:
        """The fixed-point codec for these parameters (sized so n clients never wrap)."""
        return FixedPointCodec(
            dim=self.dim,
            clip=self.clip,
            max_weight=self.max_weight,
            max_clients=self.num_clients,
            modulus_bits=self.modulus_bits,
        )

    def _encode_fields(self) -> bytes:
        w = Writer(_KIND_PARAMS)
        w.blob(self.round_id)
        w.u32(self.num_clients)
        w.u32(self.dim)
        w.u32(self.neighbors)
        w.u32(self.threshold)
        w.f64(self.clip)
        w.u64(self.max_weight)
        w.u8(self.modulus_bits)
        return w.finish()

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        return self._encode_fields()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggParams:
        """Parse :meth:`to_bytes` output.

        Raises:
            MalformedMessageError: on any encoding or validation failure.
        """
        r = Reader(data, _KIND_PARAMS)
        params = cls(
            round_id=r.blob(),
            num_clients=r.u32(),
            dim=r.u32(),
            neighbors=r.u32(),
            threshold=r.u32(),
            clip=r.f64(),
            max_weight=r.u64(),
            modulus_bits=r.u8(),
        )
        r.end()
        return params
