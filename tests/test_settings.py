"""Settings: validated once, each problem a single clear line that never shows a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.crypto import generate_key
from app.errors import ConfigurationError
from app.settings import configured_environment, load_settings

GOOD = {
    "HUBSPOT_CLIENT_ID": "id",
    "HUBSPOT_CLIENT_SECRET": "secret-value-123",
    "TOKEN_ENCRYPTION_KEYS": generate_key(),
}


def test_defaults_follow_the_contract() -> None:
    settings = load_settings(GOOD)
    assert settings.database_url == "sqlite+aiosqlite:///./hubline.db"
    assert settings.hubspot_api_url == "https://api.hubapi.com"
    assert settings.redirect_uri == "http://localhost:8000/oauth/callback"
    assert settings.token_refresh_skew_seconds == 300
    assert (settings.hubspot_requests_per_10s, settings.hubspot_searches_per_second) == (100, 4)
    assert settings.journal_poll_seconds == 60
    assert settings.default_phone_region == "US"
    assert settings.lead_source_label == "AI Receptionist"
    assert "crm.objects.contacts.write" in settings.required_scopes
    assert "crm.objects.marketing_events.write" in settings.optional_scopes
    assert "secret-value-123" not in repr(settings)


@pytest.mark.parametrize(
    "missing", ["HUBSPOT_CLIENT_ID", "HUBSPOT_CLIENT_SECRET", "TOKEN_ENCRYPTION_KEYS"]
)
def test_missing_required_setting_is_one_line_naming_it(missing: str) -> None:
    environ = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ConfigurationError) as caught:
        load_settings(environ)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(missing)
    assert "required" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://nope"),
        ("PUBLIC_URL", "hubline.example.com"),
        ("HUBSPOT_REQUESTS_PER_10S", "500"),
        ("HUBSPOT_SEARCHES_PER_SECOND", "many"),
        ("DEFAULT_PHONE_REGION", "ZZ"),
        ("DEFAULT_PHONE_REGION", "ß"),  # its upper case is SS, South Sudan
        ("SHUTDOWN_TIMEOUT_SECONDS", "0"),
        ("TOKEN_ENCRYPTION_KEYS", "hunter2"),
        ("HUBSPOT_PKCE", "perhaps"),
        ("ADMIN_TOKEN", "hunter2"),
        ("HUBSPOT_CLIENT_ID", "  "),
        ("HUBSPOT_CLIENT_SECRET", " "),
        # Each of these passed, then failed later: every HubSpot webhook ignored, a
        # traceback at the first connection, an overflow at the first rotation or poll,
        # a redirect URI of "http:/oauth/callback", an authorize URL asking no scope.
        ("HUBSPOT_APP_ID", "app-424242"),
        ("HUBSPOT_APP_ID", "\u0664\u0662\u0664\u0662"),  # digits, but never HubSpot's appId
        ("DATABASE_URL", "postgresql+asyncpg://admin:hunter2@127.0.0.1:5x432/db"),
        ("DATABASE_URL", "postgresql+asyncpg://admin:hunter2@[::1/db"),
        ("SECRET_ROTATION_GRACE_HOURS", "inf"),
        ("SECRET_ROTATION_GRACE_HOURS", "1e12"),
        ("JOURNAL_POLL_SECONDS", "99999999999999"),
        ("EVENT_RETENTION_DAYS", "999999999"),
        ("PUBLIC_URL", "http://"),
        ("HUBSPOT_API_URL", "https://api.hubapi.com:port"),
        ("HUBSPOT_SCOPES", " "),
        ("LEAD_SOURCE_LABEL", ""),
        ("LEAD_SOURCE_LABEL", "   "),
    ],
)
def test_malformed_setting_is_one_line_naming_it(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**GOOD, variable: value})
    message = str(caught.value)
    assert "\n" not in message
    assert variable in message
    assert "hunter2" not in message


def test_postgres_urls_get_the_async_driver() -> None:
    settings = load_settings({**GOOD, "DATABASE_URL": "postgres://u:p@db/hubline"})
    assert settings.database_url == "postgresql+asyncpg://u:p@db/hubline"
    assert not settings.is_sqlite


def test_a_stray_space_around_the_app_id_is_not_part_of_it() -> None:
    assert load_settings({**GOOD, "HUBSPOT_APP_ID": " 424242 "}).hubspot_app_id == "424242"


def test_settings_given_as_a_mapping_read_nothing_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What a caller (a test, the dev command) passes is all there is: neither exported
    # variables nor a .env file in the working folder change it.
    monkeypatch.setenv("HUBSPOT_SEARCHES_PER_SECOND", "2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DEFAULT_PHONE_REGION=GB\n")
    settings = load_settings(GOOD)
    assert (settings.hubspot_searches_per_second, settings.default_phone_region) == (4, "US")
    # Read from the environment, both count.
    from_environment = load_settings(
        env_file=tmp_path / ".env", **{k.lower(): v for k, v in GOOD.items()}
    )
    assert from_environment.hubspot_searches_per_second == 2
    assert from_environment.default_phone_region == "GB"


def test_the_configured_environment_is_the_environment_over_the_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("lead_source_label=From the file\nDEFAULT_PHONE_REGION=GB\n")
    monkeypatch.setenv("DEFAULT_PHONE_REGION", "FR")
    given = configured_environment(dotenv)
    assert (given["LEAD_SOURCE_LABEL"], given["DEFAULT_PHONE_REGION"]) == ("From the file", "FR")
    assert "LEAD_SOURCE_LABEL" not in configured_environment(tmp_path / "missing.env")
