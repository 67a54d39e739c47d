"""Hubline's settings: one validated object, built once at start-up and passed in."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app.errors import ConfigurationError

REQUIRED_SCOPES = (
    "oauth crm.objects.contacts.read crm.objects.contacts.write "
    "crm.schemas.contacts.read crm.schemas.contacts.write"
)
OPTIONAL_SCOPES = "crm.objects.marketing_events.read crm.objects.marketing_events.write"
SQLITE_DEFAULT_URL = "sqlite+aiosqlite:///./hubline.db"
MIN_ADMIN_TOKEN_LENGTH = 16


def region_code(text: str) -> str:
    """A phone region as typed, in the upper case of its code (ASCII only: "ß" is "SS")."""
    text = text.strip()
    return text.upper() if text.isascii() else text


class DatabaseSettings(BaseSettings):
    """The one setting `hubline migrate` needs: a deploy's migration job holds no secrets."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    database_url: str = SQLITE_DEFAULT_URL

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if value.startswith("postgres://"):
            value = "postgresql://" + value.removeprefix("postgres://")
        if value.startswith("postgresql://"):
            value = "postgresql+asyncpg://" + value.removeprefix("postgresql://")
        if value.startswith("sqlite:///"):
            value = "sqlite+aiosqlite:///" + value.removeprefix("sqlite:///")
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must be a sqlite+aiosqlite:// or postgresql+asyncpg:// URL")
        try:
            make_url(value).port  # noqa: B018 - reading it checks it
        except (ArgumentError, ValueError):
            # Never the URL itself in the message: it may hold a password.
            raise ValueError("is not a database URL SQLAlchemy can read") from None
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


class Settings(DatabaseSettings):
    """Every setting in DESIGN.md, read from the environment (or a `.env` file)."""

    hubspot_client_id: str = Field(min_length=1)
    hubspot_client_secret: SecretStr
    # [0-9], not \d: another script's digits would pass and never equal HubSpot's appId.
    hubspot_app_id: str = Field(default="", pattern=r"^\s*[0-9]*\s*$")
    hubspot_api_url: str = "https://api.hubapi.com"
    hubspot_auth_url: str = "https://app.hubspot.com"
    hubspot_scopes: str = REQUIRED_SCOPES
    hubspot_optional_scopes: str = OPTIONAL_SCOPES
    public_url: str = "http://localhost:8000"
    token_encryption_keys: SecretStr
    admin_token: SecretStr = SecretStr("")
    hubspot_pkce: bool = False
    token_refresh_skew_seconds: int = Field(default=300, ge=0)
    hubspot_requests_per_10s: int = Field(default=100, ge=1, le=110)
    hubspot_searches_per_second: int = Field(default=4, ge=1, le=5)
    # Upper bounds too: a value past them is a typo, and one past datetime's range would
    # pass start-up and fail later, in the middle of the work it times.
    journal_poll_seconds: int = Field(default=60, ge=0, le=86_400)
    event_retention_days: int = Field(default=30, ge=1, le=3_650)
    parked_retention_days: int = Field(default=30, ge=1, le=3_650)
    secret_rotation_grace_hours: float = Field(default=24, ge=0, le=8_760)
    # Above the worker's 20 s for in-flight batches, with room for the web app to close.
    shutdown_timeout_seconds: float = Field(default=30, gt=0, le=3_600)
    default_phone_region: str = "US"
    lead_source_label: str = Field(default="AI Receptionist", min_length=1, max_length=100)

    @field_validator("hubspot_app_id", "lead_source_label")
    @classmethod
    def _trimmed(cls, value: str) -> str:
        # A stray space from a .env file would make every appId comparison fail silently.
        if not value.strip() and value:
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("hubspot_scopes")
    @classmethod
    def _some_scopes(cls, value: str) -> str:
        if not value.split():
            raise ValueError("must name the scopes the app requires")
        return value

    @field_validator("hubspot_client_secret", "token_encryption_keys")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("hubspot_client_id")
    @classmethod
    def _client_id_given(cls, value: str) -> str:
        # Blank, it would pass here and fail every install at HubSpot's authorize page.
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        # The console reads and changes every portal: a short token is guessed, slowed or not.
        token = value.get_secret_value()
        if token and len(token.strip()) < MIN_ADMIN_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters (or empty: console off)"
            )
        return value

    @field_validator("hubspot_api_url", "hubspot_auth_url", "public_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - reading it checks it
        except ValueError:
            raise ValueError("is not a URL") from None
        if not parts.hostname:
            raise ValueError("must name a host")
        return value.rstrip("/")

    @field_validator("default_phone_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        region = region_code(value)
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a phone region code such as US or GB")
        return region

    @field_validator("token_encryption_keys")
    @classmethod
    def _parseable_keys(cls, value: SecretStr) -> SecretStr:
        # Imported here: crypto imports nothing from settings, but keeping the
        # parse in one place means a malformed key is reported at start-up.
        from app.crypto import parse_keys

        parse_keys(value.get_secret_value())
        return value

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/oauth/callback"

    @property
    def served_over_https(self) -> bool:
        """From PUBLIC_URL, not a request: behind a TLS-terminating proxy one arrives as http."""
        return self.public_url.startswith("https://")

    @property
    def required_scopes(self) -> list[str]:
        return self.hubspot_scopes.split()

    @property
    def optional_scopes(self) -> list[str]:
        return self.hubspot_optional_scopes.split()


class _GivenSettings(Settings):
    """Settings from the values given alone: no environment, no .env file."""

    # A developer's own .env or exported variables must not change what a test or a caller
    # asked for.

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def configured_environment(env_file: str | Path = ".env") -> dict[str, str]:
    """The variables as `load_settings()` reads them: the environment over the `.env` file."""
    from_file = dotenv_values(env_file) if Path(env_file).is_file() else {}
    values = {key.upper(): value for key, value in from_file.items() if value is not None}
    values.update((key.upper(), value) for key, value in os.environ.items())
    return values


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: str | Path | None = ".env",
    **overrides: Any,
) -> Settings:
    """Build the settings, turning a validation failure into one clear line per bad variable."""
    try:
        if environ is None:
            return Settings(_env_file=env_file, **overrides)
        values: dict[str, Any] = {key.lower(): value for key, value in environ.items()}
        values.update(overrides)
        return _GivenSettings(**values)
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(error)) from None


def load_database_settings() -> DatabaseSettings:
    """DATABASE_URL from the environment (or `.env`), as `load_settings` reads it."""
    try:
        return DatabaseSettings()
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad variable and what is wrong with it, never its value."""
    problems = []
    for item in error.errors():
        variable = "_".join(str(part) for part in item["loc"]).upper() or "settings"
        if item["type"] == "missing":
            reason = "is required"
            if variable == "TOKEN_ENCRYPTION_KEYS":
                reason += " (run `hubline keys generate` to make one)"
        else:
            reason = str(item["msg"]).removeprefix("Value error, ")
            reason = f"is invalid: {reason}"
        problems.append(f"{variable} {reason}")
    return "; ".join(problems)
