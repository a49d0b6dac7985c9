"""The agent's federation command line.

``enroll`` takes the one-time token from a private file or stdin, never from argv; ``join-round`` has no test
hooks (they live in ``tests/integration/stalling_agent.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from pathlib import Path

import pytest

from fedfer.agent.cli import main as agent_main
from fedfer.aggregator.enrollment import issue_token
from fedfer.aggregator.rounds import RoundSettings
from tests.integration.federation_harness import Harness, run_in_process

AGENT = str(Path(sys.executable).parent / "fedfer-agent")
SECRET = "fedfer-enroll-" + "s3cr3t" * 7


def _enroll_args(state: Path, *token_args: str) -> list[str]:
    return ["enroll", "--server", "127.0.0.1:1", "--ca", "/nonexistent", "--state", str(state), *token_args]


def test_a_token_on_the_command_line_or_in_a_loose_file_is_refused_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command line has no place for a token (not even as an abbreviation of --token-file).
    with pytest.raises(SystemExit) as info:
        agent_main(_enroll_args(tmp_path / "s", "--token", SECRET))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "required: --token-file" in err and SECRET not in err
    # A file other users can read, an empty one, a missing one: a clear error, the token never echoed.
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    token_file.chmod(0o644)
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    for path, message in (
        (token_file, "the token file is readable by other users; chmod 600 it"),
        (empty, "no enrollment token in the token file"),
        (tmp_path / "missing", "cannot read the token file"),
    ):
        assert agent_main(_enroll_args(tmp_path / "s", "--token-file", str(path))) == 2
        out, err = capsys.readouterr()
        assert err.strip() == f"fedfer-agent: error: {message}" and SECRET not in out + err
    assert not (tmp_path / "s").exists()  # refused before any state was written


async def _agent_enroll(h: Harness, state: Path, token_file: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the real ``fedfer-agent enroll`` process against the in-process aggregator."""
    args = _enroll_args(state, "--token-file", token_file)
    args[2], args[4] = f"127.0.0.1:{h.server.enroll_port}", str(h.root / "ca.pem")
    proc = await asyncio.create_subprocess_exec(
        AGENT,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=60)
    return int(proc.returncode or 0), out.decode(), err.decode()


def test_enroll_reads_the_token_from_a_private_file_or_stdin(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        (h.root / "ca.pem").write_bytes(h.ca_pem)
        tokens = [issue_token(h.storage, now=dt.datetime.now(dt.UTC)).token for _ in range(2)]
        token_file = tmp_path / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(tokens[0] + "\n")
        code, out, err = await _agent_enroll(h, tmp_path / "from-file", str(token_file))
        assert code == 0, err
        first = json.loads(out)["device_id"]
        code, out, err = await _agent_enroll(h, tmp_path / "from-stdin", "-", stdin=tokens[1] + "\n")
        assert code == 0, err
        second = json.loads(out)["device_id"]
        # The spent token is refused with the uniform answer, and not echoed.
        code, out, err = await _agent_enroll(h, tmp_path / "again", "-", stdin=tokens[0])
        assert code == 2 and "PERMISSION_DENIED: enrollment refused" in err and tokens[0] not in out + err
        assert sorted(d.device_id for d in h.storage.list_devices()) == sorted([first, second])

    run_in_process(tmp_path, RoundSettings(min_clients=2, max_clients=2), body)


def test_join_round_ships_no_test_hooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for hook in ("--stall-after", "--stall-round"):
        with pytest.raises(SystemExit) as info:
            agent_main(
                ["join-round", "--state", str(tmp_path), "--update", str(tmp_path / "u.npz"), hook, "1"]
            )
        assert info.value.code == 2 and f"unrecognized arguments: {hook}" in capsys.readouterr().err
