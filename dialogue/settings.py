"""Settings of the dialogue service (`lineguard dialogue`), from `LINEGUARD_DIALOGUE_*` variables.

The shared `lineguard.settings.Settings` says where Kafka and the state dir are, `StorageSettings` where
the records database and artifacts are; this class adds what only the dialogue service needs.

    >>> load_dialogue_settings(port=8080, rate_limit_per_minute=600).port
    8080

A bad value fails at start-up with a message naming the variable (`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lineguard.settings import ConfigError, Settings, load_env

DIALOGUE_ENV_PREFIX = "LINEGUARD_DIALOGUE_"


class DialogueSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=DIALOGUE_ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # tokens: a JSON file of {"tokens": [{"name", "role", "sha256", "created_at", "expires_at"}]}
    # (lineguard dialogue token create writes it; re-read within ~1 s when it changes),
    # and/or tokens in the environment: "role:name:token,role:name:token" (each >= 32 characters)
    tokens_file: Path | None = None            # default: <state_dir>/dialogue-tokens.json
    tokens: SecretStr | None = None
    # failed authentications (missing, unknown, revoked, expired token) per client address: past the limit
    # in the window, a bad token gets 429 + Retry-After instead of 401 (valid tokens still pass)
    auth_failure_limit: int = Field(default=20, ge=1)
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    # requests per token (token bucket): selecting a part in the console costs ~8-14 GETs
    rate_limit_per_minute: int = Field(default=600, ge=1)
    rate_limit_burst: int = Field(default=60, ge=1)
    max_question_chars: int = Field(default=1000, ge=10, le=10_000)
    max_turns: int = Field(default=50, ge=1)                 # questions per conversation (frame)
    cors_origins: str = ""                     # comma-separated origins; empty = CORS off
    answerer: Literal["lvlm", "template"] = "lvlm"   # free-form questions: the LVLM follow-up path, or templates
    llm: str | None = None                     # LLM dir or .gguf for free-form answers (default SmolLM2-135M)
    encoder: str | None = None                 # the encoder the workers run (default efficientnet-lite0)
    device: str = "cpu"                        # where the free-form path re-scores a stored image
    llm_history_turns: int = Field(default=1, ge=0, le=50)   # earlier turns the LLM reads (prompt length = latency)
    llm_max_new_tokens: int = Field(default=20, ge=8, le=256)  # a reply's cap, cut back to whole sentences;
                                                              # ~40 ms per token on 2 cores
    warm_up: bool = True                       # load the LLM and the stored products' references at start-up
    similar_k: int = Field(default=5, ge=1, le=50)
    stream_queue: int = Field(default=100, ge=1)             # verdicts buffered per SSE client (oldest dropped)
    # --- limits (dialogue/limits.py): what is refused before any work is done
    question_body_bytes: int = Field(default=16 * 1024, ge=1024)   # a JSON body but a label's (413 beyond);
                                                                  # a label's cap is KAFKA_MAX_MESSAGE_BYTES
    streams_per_token: int = Field(default=8, ge=1)          # open SSE streams of one token (429 beyond)
    streams_total: int = Field(default=200, ge=1)            # open SSE streams of the service (429 beyond)
    header_timeout_s: float = Field(default=10.0, gt=0)      # a request's line and headers must arrive within
    keep_alive_s: float = Field(default=5.0, gt=0)           # idle keep-alive connections are closed after
    llm_queue: int = Field(default=8, ge=1)                  # free-form questions waiting or answered (503 beyond);
                                                             # `lineguard bench dialogue` has 8 operators ask at once
    llm_retry_after_s: int = Field(default=10, ge=1)         # Retry-After of that 503
    labels_per_hour: int = Field(default=600, ge=1)          # labels per operator in any hour (429 beyond)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in filter(None, (o.strip() for o in value.split(","))):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"expected http(s)://host[:port] origins separated by commas, got {origin!r}")
        return value

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, value: SecretStr | None) -> SecretStr | None:
        from dialogue.auth import parse_env_tokens

        try:   # role:name:token, each token >= 32 characters: refused here, before anything starts
            parse_env_tokens(value.get_secret_value() if value else None)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix(f"{DIALOGUE_ENV_PREFIX}TOKENS: ")) from None
        return value

    @property
    def cors(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def token_file(self, settings: Settings) -> Path:
        return self.tokens_file or settings.state_dir / "dialogue-tokens.json"


def load_dialogue_settings(**overrides) -> DialogueSettings:
    """DialogueSettings from the environment; raises ConfigError naming the variable on a bad value."""
    return load_env(DialogueSettings, DIALOGUE_ENV_PREFIX, **overrides)
