"""The committed generated protobuf code is current, importable, and the wire contract holds."""

from __future__ import annotations

import subprocess
import sys

from fedfer.security.secagg import COLLECTING, STAGE_MESSAGE, Stage
from fedfer.v1 import common_pb2, federation_pb2, federation_pb2_grpc, models_pb2_grpc
from tests.conftest import REPO


def test_generated_code_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_stage_enum_order_and_round_trip() -> None:
    stages = [common_pb2.Stage.Name(v) for v in sorted(common_pb2.Stage.values())]
    assert stages[2:6] == ["STAGE_ADVERTISE_KEYS", "STAGE_SHARE_KEYS", "STAGE_MASKED_INPUT", "STAGE_UNMASK"]
    assert stages[8:] == ["STAGE_CHECK_IN", "STAGE_CONSISTENCY_CHECK"]
    msg = federation_pb2.MaskedInputChunk(
        request_id="0" * 36, round_id=7, index=1, count=3, total_bytes=10, data=b"\x00\xff"
    )
    assert federation_pb2.MaskedInputChunk.FromString(msg.SerializeToString()) == msg


def test_services_expose_every_stage_rpc() -> None:
    rpcs = {
        "GetRound",
        "AdvertiseKeys",
        "ShareKeys",
        "UploadMaskedInput",
        "ConsistencyCheck",
        "Unmask",
        "GetStageResult",
    }
    assert rpcs <= set(dir(federation_pb2_grpc.FederationServicer))
    assert {"GetManifest", "DownloadModel"} <= set(dir(models_pb2_grpc.ModelsServicer))
    upload = federation_pb2.DESCRIPTOR.services_by_name["Federation"].methods_by_name["UploadMaskedInput"]
    assert upload.client_streaming and not upload.server_streaming


def test_the_one_stage_enum_is_the_wire_enum_and_the_stored_text() -> None:
    """Every layer's stage is ``fedfer.security.secagg.Stage``: its values are the ``fedfer.v1.Stage`` numbers
    (name by name), its keys the texts storage has always held, its order the order of a round."""
    wire = dict(common_pb2.Stage.items())
    assert wire.pop("STAGE_UNSPECIFIED") == 0
    assert {f"STAGE_{stage.name}": stage.value for stage in Stage} == wire
    assert Stage.from_wire(common_pb2.STAGE_UNSPECIFIED) is None and Stage.from_wire(99) is None
    assert all(Stage.from_wire(stage.value) is stage for stage in Stage)
    keys = ["idle", "open", "advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask"]
    assert [stage.key for stage in Stage] == [*keys, "published", "aborted"]
    assert all(Stage.from_key(stage.key) is stage for stage in Stage)
    assert [stage.order for stage in Stage] == list(range(-1, 8))
    assert COLLECTING == tuple(stage for stage in Stage if stage.collecting) == tuple(STAGE_MESSAGE)
    walk = [Stage.CHECK_IN]
    while (nxt := walk[-1].following) is not None:
        walk.append(nxt)
    assert walk == [Stage.CHECK_IN, *COLLECTING, Stage.FINISHED]
    assert {stage for stage in Stage if stage.terminal} == {Stage.FINISHED, Stage.ABORTED}
