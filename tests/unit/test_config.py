"""The configuration in process (server/config.py): every option from a flag or LSTM_SERVE_<NAME>, a flag
over the environment over the default, and each impossible value refused at start-up (exit 2) with a
message naming the option. The Redis topology and secret options' refusals are in
tests/redis/test_redis_topology_config.py and tests/security/test_tenant_rules.py."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from server.config import (
    BATCH_CHUNK_OVERHEAD_BYTES,
    DEFAULT_MODEL,
    ENV_PREFIX,
    MESSAGE_HEADROOM_BYTES,
    ServerConfig,
    build_parser,
    load_config,
)

pytestmark = pytest.mark.timeout(30)


def refusal(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SystemExit) as exited:
        load_config(argv, environ={} if environ is None else environ)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_nothing_given_is_the_defaults_serving_the_shipped_model() -> None:
    config = load_config([], environ={})
    assert config == ServerConfig()
    assert Path(config.model) == DEFAULT_MODEL and DEFAULT_MODEL.is_file()
    assert config.address == "127.0.0.1:50051"


def test_every_option_has_a_flag_and_an_environment_variable_in_its_help() -> None:
    help_text = " ".join(build_parser().format_help().split())
    for item in fields(ServerConfig):
        assert "--" + item.name.replace("_", "-") in help_text, item.name
        assert ENV_PREFIX + item.name.upper() in help_text, item.name


def test_flags_are_parsed_to_each_options_type() -> None:
    config = load_config(["--port", "7000", "--max-delay-ms", "2.5", "--xla", "false", "--redis-cluster",
                          "--key-prefix", "p", "--warmup-timesteps", "1, 20,"], environ={})
    assert (config.port, config.max_delay_ms, config.xla, config.redis_cluster) == (7000, 2.5, False, True)
    assert config.key_prefix == "p" and config.warmup_lengths() == (1, 20)


def test_the_environment_sets_options_and_a_flag_wins_over_it() -> None:
    environ = {"LSTM_SERVE_PORT": "7001", "LSTM_SERVE_XLA": "off", "LSTM_SERVE_REDIS_AUTOSTART": "no",
               "LSTM_SERVE_STATE_TTL_S": "60", "LSTM_SERVE_LOG_FORMAT": "text", "OTHER_PORT": "1"}
    config = load_config([], environ=environ)
    assert (config.port, config.xla, config.redis_autostart, config.state_ttl_s) == (7001, False, False, 60.0)
    assert config.log_format == "text"
    assert load_config(["--port", "7002", "--xla", "yes"], environ=environ).port == 7002
    assert load_config(["--xla", "yes"], environ=environ).xla is True


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--port", "x"], {}, "argument --port: invalid int value: 'x'"),
    (["--xla", "maybe"], {}, "expected true or false, got 'maybe'"),
    ([], {"LSTM_SERVE_PORT": "x"}, "LSTM_SERVE_PORT='x': invalid literal for int()"),
    ([], {"LSTM_SERVE_XLA": "maybe"}, "LSTM_SERVE_XLA='maybe': expected true or false, got 'maybe'"),
    (["--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_option(capsys, argv: list[str], environ: dict[str, str],
                                                                  message: str) -> None:
    assert message in refusal(capsys, argv, environ)


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--max-chunk-timesteps", "0"], "--max-chunk-timesteps must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "2", "--port", "0"], "--workers above 1 needs a fixed --port"),
    (["--max-in-flight", "0"], "--max-in-flight must be at least 1"),
    (["--slot-memory-mb", "-1"], "--slot-memory-mb must not be negative"),
    (["--slot-memory-roaming-s", "-1"], "--slot-memory-roaming-s must not be negative"),
    (["--slot-memory-roaming-s", "nan"], "--slot-memory-roaming-s must not be negative"),
    (["--warmup-timesteps", "1,x"], "--warmup-timesteps must be comma-separated positive integers, got '1,x'"),
    (["--warmup-timesteps", "20,0"], "--warmup-timesteps must be comma-separated positive integers"),
    (["--max-delay-ms", "-1"], "--max-delay-ms must not be negative"),
    (["--busy-delay-ms", "-1"], "--busy-delay-ms must not be negative"),
    (["--busy-delay-ms", "nan"], "--busy-delay-ms must not be negative"),
    (["--request-deadline-s", "0"], "--request-deadline-s must be positive"),
    (["--state-ttl-s", "0"], "--state-ttl-s and --ended-ttl-s must be positive"),
    (["--ended-ttl-s", "-1"], "--state-ttl-s and --ended-ttl-s must be positive"),
    (["--port", "65536"], "--port must be between 0 and 65535"),
    (["--redis-wait-replicas", "-1"], "--redis-wait-replicas must not be negative"),
    (["--max-message-bytes", "-1"], "--max-message-bytes must not be negative"),
    (["--max-concurrent-rpcs", "0"], "--max-concurrent-rpcs must be at least 1"),
    (["--max-queued-chunks", "0"], "--max-queued-chunks must be at least 1"),
    (["--stream-window", "0"], "--stream-window must be at least 1"),
    (["--stream-window-bytes", "0"], "--stream-window-bytes must be at least 1"),
    (["--drain-delay-s", "-1"], "--drain-delay-s must not be negative"),
    (["--shutdown-grace-s", "0"], "--shutdown-grace-s must be positive"),
    (["--drain-delay-s", "15", "--shutdown-grace-s", "15"], "--drain-delay-s (15) must be shorter than"),
    (["--log-format", "xml"], "--log-format must be json or text"),
    (["--tls-key", "server.key"], "--tls-cert and --tls-key go together"),
    (["--api-keys", "keys", "--tenant-max-streams", "-1"], "must be 0 (no limit) or positive"),
    (["--api-keys", "keys", "--tenant-chunks-per-s", "inf"], "must be 0 (no limit) or positive"),
])
def test_impossible_values_are_refused_naming_the_option(capsys, argv: list[str], message: str) -> None:
    assert message in refusal(capsys, argv)


def test_the_environment_is_checked_like_the_flags(capsys) -> None:
    assert "--max-batch must be at least 1" in refusal(capsys, [], {"LSTM_SERVE_MAX_BATCH": "0"})


def test_message_limits_fit_the_largest_chunk_or_gateway_message_unless_set() -> None:
    """The derived limit fits the larger of one chunk (Predict) and one full PredictBatch message: its
    timesteps' floats, plus the ids and tags of --max-batch-chunks chunks."""
    derived = load_config(["--max-chunk-timesteps", "100", "--max-batch-timesteps", "50",
                           "--max-batch-chunks", "10"], environ={})
    headroom = MESSAGE_HEADROOM_BYTES + 10 * BATCH_CHUNK_OVERHEAD_BYTES
    assert derived.message_limits(input_features=3, output_size=5) == (100 * 3 * 4 + headroom, 100 * 5 * 4 + headroom)
    assert derived.message_limits(input_features=5, output_size=3)[1] == 100 * 5 * 4 + headroom
    gateway = load_config(["--max-chunk-timesteps", "100", "--max-batch-timesteps", "4000",
                           "--max-batch-chunks", "256"], environ={})
    headroom = MESSAGE_HEADROOM_BYTES + 256 * BATCH_CHUNK_OVERHEAD_BYTES
    assert gateway.message_limits(input_features=2, output_size=1) == (4000 * 2 * 4 + headroom,) * 2
    assert load_config(["--max-message-bytes", "1000"], environ={}).message_limits(3, 5) == (1000, 1000)


def test_sentinel_credentials_without_sentinels_are_refused_without_echoing_them(capsys) -> None:
    message = refusal(capsys, ["--redis-url", "redis://127.0.0.1/0?sentinel_password=s3cret-pw"])
    assert "--redis-url: sentinel_password are the sentinels' credentials, for --redis-sentinels only" in message
    assert "s3cret-pw" not in message
