"""A tiny run of ``fedfer-bench federation`` (real aggregator process, real gRPC): its JSON and figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = str(Path(sys.executable).parent / "fedfer-bench")


def test_a_five_device_round_reports_measured_wire_bytes() -> None:
    args = ["federation", "--clients", "5", "--dim", "2000", "--dropout", "0.2", "--deadline-s", "3"]
    proc = subprocess.run([BENCH, *args, "--procs", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert {"round_s", "max_abs_error", "bytes_up_per_client", "wire_overhead", "server_cpu_s"} <= set(out)
    assert out["ok"] is True and (out["clients"], out["dim"], out["dropped"]) == (5, 2000, 1)
    assert out["max_abs_error"] < 1e-5 and out["round_s"] > 0 and out["server_cpu_s"] > 0
    # Measured on the wire, TLS handshake included: more than the payload, and at least the raw update.
    assert out["tls_handshake_included"] is True and out["raw_update_bytes"] == 4 * 2000
    assert out["bytes_up_per_client"] > out["payload_up_per_client"] > out["raw_update_bytes"]
    assert out["bytes_up_per_client_max"] >= out["bytes_up_per_client"]
    assert out["wire_overhead"] == round(out["bytes_up_per_client"] / out["raw_update_bytes"], 4)
    assert out["wire_overhead_max"] >= out["wire_overhead"] > out["wire_overhead_excl_handshake"] > 1.0
    assert 1000 < out["connection_setup_bytes_up"] < 8000 and out["connections_per_client"] >= 1
    assert "Traceback" not in proc.stderr
