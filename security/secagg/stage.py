"""The stages of one secure-aggregation round: one enum that every layer uses as it is.

A round moves through the stages in the order they are defined here: ``CHECK_IN`` (devices join), the five
stages in which devices send protocol messages (:data:`COLLECTING`: advertise keys, share keys, masked input,
consistency check, unmask), then ``FINISHED`` (the mean was published) or ``ABORTED``. ``IDLE`` means no round
is open. Each layer reads the same member:

* the wire: ``stage.value`` is the stage's number in ``fedfer.v1.Stage`` (``protos/fedfer/v1/common.proto``;
  tests/test_protos.py checks every member against it by name), :meth:`Stage.from_wire` reads one;
* storage: ``stage.key`` is the text a round's status is stored as (``open``, ``advertise_keys``, ...,
  ``published``, ``aborted``; unchanged since the first schema), :meth:`Stage.from_key` reads it back;
* the protocol state machines (:class:`~fedfer.security.secagg.server.SecAggServer`,
  :class:`~fedfer.security.secagg.client.SecAggClient`) are in a collecting stage, ``FINISHED`` or
  ``ABORTED``; a server snapshot stores ``stage.order``;
* order: ``stage.order`` counts the stages from check-in (``IDLE`` is -1, ``CHECK_IN`` 0, ``ADVERTISE_KEYS``
  1, ..., ``UNMASK`` 5, ``FINISHED`` 6, ``ABORTED`` 7); :attr:`Stage.following` is the stage a round enters
  next.
"""

from __future__ import annotations

import enum

__all__ = ["COLLECTING", "Stage"]


class Stage(enum.Enum):
    """A stage of a round (see the module docstring): ``value`` on the wire, ``key`` in storage."""

    _value_: int
    key: str

    IDLE = (1, "idle")
    CHECK_IN = (8, "open")
    ADVERTISE_KEYS = (2, "advertise_keys")
    SHARE_KEYS = (3, "share_keys")
    MASKED_INPUT = (4, "masked_input")
    CONSISTENCY_CHECK = (9, "consistency_check")
    UNMASK = (5, "unmask")
    FINISHED = (6, "published")
    ABORTED = (7, "aborted")

    def __new__(cls, number: int, key: str) -> Stage:
        member = object.__new__(cls)
        member._value_ = number
        member.key = key
        return member

    @property
    def order(self) -> int:
        """Position in a round, counted from check-in (``IDLE`` -1, ``CHECK_IN`` 0, ..., ``ABORTED`` 7)."""
        return _ORDER[self]

    @property
    def terminal(self) -> bool:
        """True for ``FINISHED`` and ``ABORTED``: the round is over."""
        return self in (Stage.FINISHED, Stage.ABORTED)

    @property
    def collecting(self) -> bool:
        """True for the five stages in which devices send protocol messages (:data:`COLLECTING`)."""
        return self in COLLECTING

    @property
    def following(self) -> Stage | None:
        """The stage a round enters when this one closes (``None`` for ``IDLE`` and the terminal stages)."""
        return _FOLLOWING.get(self)

    @classmethod
    def from_wire(cls, number: int) -> Stage | None:
        """The stage numbered ``number`` in ``fedfer.v1.Stage`` (``None``: ``STAGE_UNSPECIFIED``, unknown)."""
        return _BY_WIRE.get(number)

    @classmethod
    def from_key(cls, key: str) -> Stage:
        """The stage stored as ``key``.

        Raises:
            ValueError: no stage is stored under ``key``.
        """
        stage = _BY_KEY.get(key)
        if stage is None:
            raise ValueError("unknown stage")
        return stage

    @classmethod
    def from_order(cls, order: int) -> Stage | None:
        """The stage at position ``order`` (see :attr:`order`; ``None`` outside -1..7)."""
        return _BY_ORDER.get(order)


#: The stages in which devices send protocol messages, in protocol order.
COLLECTING = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
)
_ORDER = {stage: position - 1 for position, stage in enumerate(Stage)}
_BY_ORDER = {position: stage for stage, position in _ORDER.items()}
_BY_KEY = {stage.key: stage for stage in Stage}
_BY_WIRE = {stage.value: stage for stage in Stage}
_FOLLOWING = {
    Stage.CHECK_IN: Stage.ADVERTISE_KEYS,
    **{stage: after for stage, after in zip(COLLECTING, (*COLLECTING[1:], Stage.FINISHED), strict=True)},
}
