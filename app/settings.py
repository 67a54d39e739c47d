"""Hubline's settings: one validated object, built once at start-up and passed in."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import phonenumbers
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.errors import ConfigurationError

REQUIRED_SCOPES = (
    "oauth crm.objects.contacts.read crm.objects.contacts.write "
    "crm.schemas.contacts.read crm.schemas.contacts.write"
)
OPTIONAL_SCOPES = "crm.objects.marketing_events.read crm.objects.marketing_events.write"
SQLITE_DEFAULT_URL = "sqlite+aiosqlite:///./hubline.db"
MIN_ADMIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    """Every setting in DESIGN.md, read from the environment (or a `.env` file)."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    database_url: str = SQLITE_DEFAULT_URL
    hubspot_client_id: str = Field(min_length=1)
    hubspot_client_secret: SecretStr
    hubspot_app_id: str = ""
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
    journal_poll_seconds: int = Field(default=60, ge=0)
    event_retention_days: int = Field(default=30, ge=1)
    parked_retention_days: int = Field(default=30, ge=1)
    secret_rotation_grace_hours: float = Field(default=24, ge=0)
    default_phone_region: str = "US"
    lead_source_label: str = "AI Receptionist"

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
        return value.rstrip("/")

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
        return value

    @field_validator("default_phone_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        region = value.strip().upper()
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
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def required_scopes(self) -> list[str]:
        return self.hubspot_scopes.split()

    @property
    def optional_scopes(self) -> list[str]:
        return self.hubspot_optional_scopes.split()


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
        values = {key.lower(): value for key, value in environ.items()}
        values.update(overrides)
        # model_validate reads only these values: no environment, no .env file.
        return Settings.model_validate(values)
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
