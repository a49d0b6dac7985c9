"""Configuration: schema, defaults, errors that name the key, path-only environment overrides."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedfer.agent.config import (
    AgentConfig,
    CaptureSection,
    ConfigError,
    apply_path_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_config,
)

GOOD = """
[agent]
state_dir = "/var/lib/fedfer-agent"
log_level = "debug"

[capture]
source = "camera:1"
fps = 7.5

[vision]
min_score = 0.6

[cache]
retention_days = 7
max_bytes = 104857600

[learning]
num_classes = 4

[privacy]
dp = true
target_epsilon = 2.0
delta = 1e-6
budget = 8.0

[federation]
server = "agg.example.org:8443"
ca = "/etc/fedfer/ca.pem"

[daemon]
drain_timeout_s = 5
queue_hwm = 16
"""


def test_good_file_parses_into_typed_sections(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.capture.source == "camera:1" and config.capture.fps == 7.5
    assert config.learning.num_classes == 4 and config.cache.retention_days == 7
    assert config.federation.server == "agg.example.org:8443"
    assert config.daemon.queue_hwm == 16
    assert config_from_dict(config_to_dict(config)) == config


def test_defaults_are_secure() -> None:
    config = parse_config("")
    assert config == AgentConfig()
    assert config.privacy.dp is True
    assert config.federation.server == ""  # nothing leaves the device unless configured
    assert config.cache.retention_days <= 30
    assert config.vision.detector_sha256  # the detector file is pinned
    assert config.learning.allow_untrained_ifer is False  # no learning from an untrained IFER head


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[capture]\nfps = 0", "config error: capture.fps must be a number in (0, 60]"),
        ("[capture]\nfps = 61", "capture.fps must be a number in (0, 60]"),
        ("[capture]\nfps = true", "capture.fps must be a number in (0, 60]"),
        ('[capture]\nfps = "5"', "capture.fps must be a number in (0, 60]"),
        ("[capture]\nfps = nan", "capture.fps must be a number in (0, 60]"),
        ('[capture]\nsource = ""', "capture.source must be a non-empty string"),
        ('[capture]\nsource = "camera:x"', "capture.source camera index"),
        ("[capture]\nframes = 3", "unknown key capture.frames"),
        ("[camera]\nfps = 3", "unknown section [camera]"),
        ("capture = 3", "capture must be a table"),
        ("[cache]\nretention_days = 0", "cache.retention_days must be an integer in [1, 3650]"),
        ("[cache]\nretention_days = 1.5", "cache.retention_days must be an integer"),
        ('[cache]\nkey_store = "plain"', 'cache.key_store must be one of "file", "keyring"'),
        ("[learning]\nnum_classes = 5", "learning.num_classes must be one of 4, 6"),
        ("[learning]\nnum_classes = true", "learning.num_classes must be one of 4, 6"),
        ("[learning]\nallow_untrained_ifer = 1", "learning.allow_untrained_ifer must be true or false"),
        ("[privacy]\ndelta = 0.5", "privacy.delta must be a number in (0, 0.01]"),
        ("[privacy]\ntarget_epsilon = 10\nbudget = 5", "privacy.budget must be at least"),
        ('[federation]\nserver = "nohost"\nca = "/x"', "federation.server must look like host:port"),
        ('[federation]\nserver = "h:99999"\nca = "/x"', "federation.server must look like host:port"),
        ('[federation]\nserver = "h:8443"', "federation.ca must be set"),
        ('[vision]\ndetector_sha256 = "abc"', "vision.detector_sha256 must be a 64-character"),
        ("[daemon]\nheartbeat_interval_s = 2\nheartbeat_timeout_s = 3", "heartbeat_timeout_s must exceed"),
        ("[daemon]\nqueue_hwm = 0", "daemon.queue_hwm must be an integer in [1, 100000]"),
        ('[agent]\nlog_level = "loud"', "agent.log_level must be one of"),
        ('[agent]\nstate_dir = "a\\u0000b"', "agent.state_dir must not contain NUL"),
        ("[capture\nfps = 3", "not valid TOML"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)
    assert str(info.value).startswith("config error: ")


def test_unreadable_or_huge_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[capture]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match="larger than"):
        parse_config("#" * (300 * 1024))


def test_sections_are_keyword_only_and_checked_in_init() -> None:
    with pytest.raises(TypeError):
        CaptureSection("camera:0")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"capture\.max_width"):
        CaptureSection(max_width=10)


def test_environment_overrides_paths_only(tmp_path: Path) -> None:
    config = parse_config(GOOD)
    env = {"FEDFER_STATE_DIR": str(tmp_path / "s"), "FEDFER_ASSETS": "rel/assets", "FEDFER_CAPTURE_FPS": "50"}
    out = apply_path_overrides(config, env)
    assert out.agent.state_dir == str(tmp_path / "s")
    assert out.agent.assets_dir == str(Path("rel/assets").absolute())
    assert out.capture == config.capture  # non-path settings never come from the environment
    assert out.model_path("models/x.tflite") == Path("rel/assets").absolute() / "models/x.tflite"
    assert out.model_path("/abs/x") == Path("/abs/x")
    with pytest.raises(ConfigError, match="FEDFER_STATE_DIR must be a non-empty path"):
        apply_path_overrides(config, {"FEDFER_STATE_DIR": ""})


def test_default_state_dir_follows_xdg_then_home(tmp_path: Path) -> None:
    config = AgentConfig()
    assert apply_path_overrides(config, {"XDG_STATE_HOME": str(tmp_path)}).state_dir == tmp_path / "fedfer"
    home = apply_path_overrides(config, {"HOME": str(tmp_path)}).state_dir
    assert home == tmp_path / ".local" / "state" / "fedfer"
    with pytest.raises(ConfigError, match="state_dir is not set"):
        apply_path_overrides(config, {})
    with pytest.raises(ConfigError, match="not set"):
        _ = config.state_dir


def test_turning_dp_off_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        parse_config("[privacy]\ndp = false")
    assert any("differential privacy is OFF" in r.getMessage() for r in caplog.records)


def test_example_file_documents_every_key_with_its_default() -> None:
    import dataclasses

    example = Path(__file__).resolve().parents[2] / "deploy" / "agent.example.toml"
    config = load_config(example)
    assert config == AgentConfig()
    data = config_to_dict(config)
    text = example.read_text()
    for section, values in data.items():
        assert f"[{section}]" in text
        for key in values:
            assert f"\n{key} = " in text, f"{section}.{key} is not documented in agent.example.toml"
    assert {f.name for f in dataclasses.fields(AgentConfig)} == set(data)
