"""The ``fedfer-bench secagg`` benchmark: its JSON fields, and a non-zero exit when the round aborts."""

from __future__ import annotations

import json
import subprocess
import sys

from fedfer.bench.cli import main

FAST = ["--measure-seconds", "0.05"]
FIELDS = {
    "clients",
    "dim",
    "neighbors",
    "threshold",
    "dropped",
    "max_abs_error",
    "client_s",
    "server_s",
    "upload_bytes_per_client",
    "prg_bytes_per_s",
    "bound_ratio",
}


def test_small_round_reports_every_field(capsys):
    code = main(
        ["secagg", "--clients", "12", "--dim", "300", "--dropout", "0.34", "--drop-stage", "mixed", *FAST]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] is True
    assert set(out) >= FIELDS
    assert out["clients"] == 12 and out["dim"] == 300 and out["dropped"] == 4
    assert out["max_abs_error"] <= out["error_bound"] < 1e-3
    assert out["prg_bytes_per_s"] == max(out["prg_rates"].values())
    assert out["bound_ratio"] >= out["bound_ratio_floor"] > 1.0
    assert out["survivors"] == 12 - 3  # of 4 dropped (one per stage), the one dropping at unmask still counts


def test_complete_graph_option(capsys):
    assert main(["secagg", "--clients", "8", "--dim", "50", "--dropout", "0.0", "--complete", *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["complete_graph"] is True and out["neighbors"] == 7 and out["dropped"] == 0


def test_aborted_round_exits_non_zero():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedfer.bench.cli",
            "secagg",
            "--clients",
            "6",
            "--dim",
            "20",
            "--dropout",
            "0.5",
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert out["ok"] is False and "error" in out and "max_abs_error" not in out
