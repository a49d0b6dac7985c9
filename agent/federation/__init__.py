"""The device side of federation: enrollment, central-model download and secure-aggregation rounds.

Mutual TLS with a device certificate issued at enrollment, pinned to the deployment CA; idempotent requests
retried with jittered exponential backoff; nothing leaves the device but protocol messages.
"""

from fedfer.agent.federation.client import CentralModel, FederationClient, RoundOutcome, WireCounter
from fedfer.agent.federation.enroll import enroll, new_device_id
from fedfer.agent.federation.retry import RetryPolicy
from fedfer.agent.federation.state import DeviceState, StateError

__all__ = [
    "CentralModel",
    "DeviceState",
    "FederationClient",
    "RetryPolicy",
    "RoundOutcome",
    "StateError",
    "WireCounter",
    "enroll",
    "new_device_id",
]
