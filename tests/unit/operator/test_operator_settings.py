"""Operator settings from the environment: the report port's TLS, the metrics port, the report rate."""

from __future__ import annotations

import pytest

from kubetune.operator.settings import OperatorSettings, SettingsError


def test_defaults_serve_reports_and_metrics_on_separate_ports_over_plain_http() -> None:
    settings = OperatorSettings.from_env({})
    assert (settings.http_port, settings.metrics_port) == (8080, 8081)
    assert settings.tls_cert_file == settings.tls_key_file == settings.progress_ca == ""
    assert (settings.report_rate, settings.report_burst) == (20.0, 100)


def test_tls_rate_and_metrics_port_are_read() -> None:
    settings = OperatorSettings.from_env({
        "KUBETUNE_TLS_CERT_FILE": "/tls/tls.crt", "KUBETUNE_TLS_KEY_FILE": "/tls/tls.key",
        "KUBETUNE_PROGRESS_CA": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        "KUBETUNE_METRICS_PORT": "9090", "KUBETUNE_REPORT_RATE": "2.5", "KUBETUNE_REPORT_BURST": "7"})
    assert (settings.tls_cert_file, settings.tls_key_file) == ("/tls/tls.crt", "/tls/tls.key")
    assert settings.progress_ca.startswith("-----BEGIN CERTIFICATE-----")
    assert (settings.metrics_port, settings.report_rate, settings.report_burst) == (9090, 2.5, 7)


@pytest.mark.parametrize(("env", "problem"), [
    ({"KUBETUNE_TLS_CERT_FILE": "/tls/tls.crt"}, r"set both \(HTTPS\) or neither"),
    ({"KUBETUNE_TLS_KEY_FILE": "/tls/tls.key"}, r"set both \(HTTPS\) or neither"),
    ({"KUBETUNE_HTTP_PORT": "9000", "KUBETUNE_METRICS_PORT": "9000"}, "KUBETUNE_METRICS_PORT: must differ"),
    ({"KUBETUNE_REPORT_RATE": "fast"}, "KUBETUNE_REPORT_RATE: must be a number"),
    ({"KUBETUNE_REPORT_BURST": "-1"}, "KUBETUNE_REPORT_BURST: must be >= 0"),
    ({"KUBETUNE_WORKER_LIMIT": "many"}, "KUBETUNE_WORKER_LIMIT: must be a number"),
    ({"KUBETUNE_WORKER_LIMIT": "-4"}, "KUBETUNE_WORKER_LIMIT: must be >= 0"),
])
def test_unusable_values_are_refused_naming_the_variable(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        OperatorSettings.from_env(env)


def test_kopf_works_on_a_bounded_number_of_objects_at_once_unless_told_otherwise() -> None:
    assert OperatorSettings.from_env({}).worker_limit == 64
    assert OperatorSettings.from_env({"KUBETUNE_WORKER_LIMIT": "8"}).worker_limit == 8
    assert OperatorSettings.from_env({"KUBETUNE_WORKER_LIMIT": "0"}).worker_limit == 0  # no limit


def test_kopf_is_given_the_worker_limit_and_lists_in_pages() -> None:
    """What the start-up handler sets in kopf: the worker limit, and the initial listing in pages (kopf
    lists in one piece by default: every job's body decoded at once)."""
    import kopf

    from kubetune.operator.jobs import handlers

    settings = kopf.OperatorSettings()
    assert settings.watching.chunk_size is None  # kopf's default
    handlers.bound_kopf_memory(settings, OperatorSettings.from_env({}))
    assert settings.queueing.worker_limit == 64
    assert settings.queueing.idle_timeout == 0.5
    assert settings.watching.chunk_size == handlers.LIST_CHUNK > 0
    handlers.bound_kopf_memory(settings, OperatorSettings.from_env({"KUBETUNE_WORKER_LIMIT": "0"}))
    assert settings.queueing.worker_limit is None


def test_port_zero_twice_means_two_free_ports() -> None:
    settings = OperatorSettings.from_env({"KUBETUNE_HTTP_PORT": "0", "KUBETUNE_METRICS_PORT": "0"})
    assert settings.http_port == settings.metrics_port == 0
