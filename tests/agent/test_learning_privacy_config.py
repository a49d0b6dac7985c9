"""``[privacy]`` settings of DP-SGD and of user-level DP for rounds: exclusive choices, budgets, defaults."""

from __future__ import annotations

import pytest

from fedfer.agent.config import ConfigError, parse_config
from fedfer.security.dp import gaussian_epsilon


def test_defaults_keep_round_dp_off_and_dp_sgd_on_by_target_epsilon() -> None:
    privacy = parse_config("").privacy
    assert privacy.dp is True and privacy.target_epsilon == 4.0 and privacy.noise_multiplier == 0.0
    assert privacy.round_dp is False and privacy.round_clients == 1


def test_a_noise_multiplier_replaces_the_target_epsilon() -> None:
    privacy = parse_config("[privacy]\ntarget_epsilon = 0\nnoise_multiplier = 1.3").privacy
    assert privacy.noise_multiplier == 1.3 and privacy.target_epsilon == 0
    rounds = parse_config(
        "[privacy]\nround_dp = true\nround_target_epsilon = 0\nround_noise_multiplier = 2.0\n"
        "round_clients = 5"
    ).privacy
    assert rounds.round_noise_multiplier == 2.0 and rounds.round_clients == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("noise_multiplier = 1.0", "target_epsilon and privacy.noise_multiplier are mutually exclusive"),
        ("target_epsilon = 0", "privacy.target_epsilon or privacy.noise_multiplier must be positive"),
        ("noise_multiplier = -1.0\ntarget_epsilon = 0", "privacy.noise_multiplier must be a number in [0"),
        ("round_dp = true\nround_noise_multiplier = 1.0", "exclusive (set round_target_epsilon = 0"),
        ("round_dp = true\nround_target_epsilon = 0", "privacy.round_target_epsilon or privacy.round_noise"),
        ("round_target_epsilon = 5\nround_budget = 2", "privacy.round_budget must be at least"),
        ("round_clients = 0", "privacy.round_clients must be an integer in [1, 1000000]"),
        ("round_clip_norm = 0", "privacy.round_clip_norm must be a number in (0, 1000]"),
        ("round_dp = 1", "privacy.round_dp must be true or false"),
        (
            "round_dp = true\nround_target_epsilon = 0\nround_noise_multiplier = 0.5\nround_budget = 1",
            "privacy.round_budget cannot pay for one round",
        ),
    ],
)
def test_bad_privacy_settings_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[privacy]\n" + text)
    assert message in str(info.value)


def test_turning_dp_sgd_off_needs_neither_setting() -> None:
    assert parse_config("[privacy]\ndp = false\ntarget_epsilon = 0").privacy.dp is False
    # a tiny noise multiplier whose one round costs more than the budget is refused; a large one fits
    assert gaussian_epsilon(0.5, 1, 1e-5) > 1
    ok = "[privacy]\nround_dp = true\nround_target_epsilon = 0\nround_noise_multiplier = 8.0\n"
    ok += "round_budget = 1"
    assert parse_config(ok).privacy.round_dp is True
