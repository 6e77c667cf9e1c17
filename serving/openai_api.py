"""OpenAI wire format pieces shared by the HF server and the vLLM middleware.

- `ServedVersion`: the memory version a response was served with, as headers
  (`x-kvedit-memory`, `x-kvedit-memory-version`) and as the body field `kvedit`.
- Request models for /v1/completions and /v1/chat/completions (HF backend; extra fields
  are accepted and ignored, as OpenAI-compatible servers do).
- OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.
- Choosing a memory per request: the `model` field `BASE:MEMORY` or the request header
  `x-kvedit-memory: MEMORY` (`requested_memory`); the admin request body (`AdminMemoryRequest`).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HEADER_MEMORY = "x-kvedit-memory"
HEADER_VERSION = "x-kvedit-memory-version"
HEADER_FIRST_VERSION = "x-kvedit-memory-first-version"
UNKNOWN = "unknown"
_SALT_FORBIDDEN = set("@/\\\x00")


@dataclass(frozen=True)
class ServedVersion:
    """The memory a response was served with.

    `first_version` is set only when the version changed while the request ran (vLLM applies
    new versions between steps); `version` is then the one in force at the end.
    `version` None with `unknown` True: the server could not tell (the body says "unknown").
    """

    memory: str | None
    version: int | None
    first_version: int | None = None
    unknown: bool = False

    @classmethod
    def from_status(cls, before: dict | None, after: dict | None = None) -> "ServedVersion | None":
        """From `MemoryFollower.status()` dicts taken before and after the request (None: no memory)."""
        if before is None:
            return None
        end = after if after is not None else before
        first = before.get("version")
        last = end.get("version")
        return cls(end.get("memory"), last, first if first != last else None)

    @classmethod
    def base(cls) -> "ServedVersion":
        """A request a memory replica served with the base model (it chose no memory)."""
        return cls(None, None)

    def headers(self) -> dict[str, str]:
        version = UNKNOWN if self.unknown else "" if self.version is None else str(self.version)
        out = {HEADER_MEMORY: str(self.memory or ""), HEADER_VERSION: version}
        if self.first_version is not None:
            out[HEADER_FIRST_VERSION] = str(self.first_version)
        return out

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"memory": self.memory, "version": UNKNOWN if self.unknown else self.version}
        if self.first_version is not None:
            out["first_version"] = self.first_version
        return out


def cache_salt(memory: str, version: int) -> str:
    """Prefix-cache salt of one memory version (vLLM forbids '@', '/', '\\' and NUL, max 128 chars)."""
    salt = f"kvedit-{memory}-v{version}"
    if len(salt) > 128 or _SALT_FORBIDDEN & set(salt):
        salt = "kvedit-" + hashlib.sha256(f"{memory}\x00{version}".encode()).hexdigest()[:40] + f"-v{version}"
    return salt


class MemoryChoiceError(ValueError):
    """A request whose model field and memory header disagree, or name another model."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def requested_memory(model: str, served_name: str, header: str | None = None) -> str | None:
    """The memory a request chose: `BASE:MEMORY` in `model`, or the `x-kvedit-memory` header.

    None: the plain base name without a header (the replica's default memory, if it has one).
    Raises MemoryChoiceError (404) for another model, (400) when model field and header disagree.
    """
    if model == served_name:
        chosen = None
    elif model.startswith(served_name + ":") and len(model) > len(served_name) + 1:
        chosen = model[len(served_name) + 1:]
    else:
        raise MemoryChoiceError(f"the model `{model}` does not exist; this server serves `{served_name}` "
                                f"and `{served_name}:MEMORY` for each memory it serves (GET /v1/models)", 404)
    header = header.strip() if header is not None else None
    if header:
        if chosen is not None and chosen != header:
            raise MemoryChoiceError(f"the model field chooses memory {chosen!r} but the {HEADER_MEMORY} header "
                                    f"chooses {header!r}")
        chosen = header
    return chosen


def model_entries(served_name: str, memories: list[str]) -> list[dict]:
    """/v1/models entries: the base name, then `BASE:MEMORY` for each memory."""
    return [{"id": served_name, "object": "model", "created": 0, "owned_by": "kvedit"}] + [
        {"id": f"{served_name}:{m}", "object": "model", "created": 0, "owned_by": "kvedit", "root": served_name}
        for m in memories]


class AdminMemoryRequest(BaseModel):
    """POST /admin/memory: serve `memory` (NAME or NAME@VERSION).

    action "swap": it becomes the default memory (what the plain model name gets) and the
    previous default retires unless `keep_previous`; "add": loaded beside the others.
    """

    model_config = ConfigDict(extra="forbid")

    memory: str = Field(min_length=1)
    action: Literal["swap", "add"] = "swap"
    keep_previous: bool = False


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # torch.manual_seed's range
    stream: bool = False
    user: str | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None  # refused by the hf backend


class ContentPart(BaseModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` parts are read."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


# ---------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_response(model: str, choices: list[dict], usage: dict, served: ServedVersion | None) -> dict:
    body = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}
    if served is not None:
        body["kvedit"] = served.body()
    return body


def chat_response(model: str, choices: list[dict], usage: dict, served: ServedVersion | None) -> dict:
    body = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}
    if served is not None:
        body["kvedit"] = served.body()
    return body
