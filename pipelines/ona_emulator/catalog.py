"""The list endpoints for what usage ids point to: projects, environment classes, runners.

Their items are derived from the store's records (every id a record names is listed), with
names from `UsageStore.names` where given and made-up ones otherwise, so they always agree
with the usage records. Shapes follow the official SDK's models (gitpod-sdk 0.11).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from .protocol import ConnectError

ENDPOINTS = {
    "/gitpod.v1.ProjectService/ListProjects": ("projects", "projects"),
    "/gitpod.v1.EnvironmentService/ListEnvironmentClasses": ("environment_classes", "environmentClasses"),
    "/gitpod.v1.RunnerService/ListRunners": ("runners", "runners"),
    "/gitpod.v1.OrganizationService/ListMembers": ("members", "members"),
}
IDENTITY = "/gitpod.v1.IdentityService/GetAuthenticatedIdentity"
MEMBER_SINCE = "2025-06-01T09:00:00Z"
DEFAULT_PAGE_SIZE = 25


def match(path: str) -> tuple[str, str] | None:
    """(kind, JSON key) for a catalog path, or None."""
    for endpoint, kind in ENDPOINTS.items():
        if path.endswith(endpoint):
            return kind
    return None


def members(users: list[str], names: dict[str, str], left: set[str]) -> list[dict[str, Any]]:
    """Every user of a record who has not left, as `OrganizationMember` (gitpod-sdk)."""
    return [
        {
            "userId": user,
            "fullName": names.get(user, f"User {user[:8]}"),
            "email": f"{user[:8]}@example.com",
            "avatarUrl": f"https://example.com/avatars/{user[:8]}.png",
            "role": "ORGANIZATION_ROLE_ADMIN" if i == 0 else "ORGANIZATION_ROLE_MEMBER",
            "status": "USER_STATUS_ACTIVE",
            "memberSince": MEMBER_SINCE,
            "loginProvider": "github",
        }
        for i, user in enumerate(sorted({u for u in users if u} - left))
    ]


def items(referenced: list[tuple[str, str, str]], names: dict[str, str], kind: str) -> list[dict[str, Any]]:
    """The list `kind` from the (projectId, environmentClassId, runnerId) of every record."""
    if kind == "projects":
        ids = sorted({project for project, _, _ in referenced if project})
        return [{"id": i, "metadata": {"name": names.get(i, f"project-{i[:8]}")}} for i in ids]
    if kind == "runners":
        ids = sorted({runner for _, _, runner in referenced if runner})
        return [{"runnerId": i, "name": names.get(i, f"runner-{i[:8]}")} for i in ids]
    runner_of = {cls: runner for _, cls, runner in referenced if cls}
    return [
        {
            "id": i,
            "runnerId": runner_of[i],
            "displayName": names.get(i, f"class-{i[:8]}"),
            "description": f"{names.get(i, 'environment class')} on runner {names.get(runner_of[i], runner_of[i][:8])}",
        }
        for i in sorted(runner_of)
    ]


def page(all_items: list[dict[str, Any]], key: str, query: dict[str, str], body: Any) -> bytes:
    """One page of `all_items`, token-paged like the usage endpoint (token and size in query or body)."""
    pagination = (body or {}).get("pagination") or {} if isinstance(body, dict) else {}
    size = int(query.get("pageSize") or pagination.get("pageSize") or DEFAULT_PAGE_SIZE)
    if not 0 < size <= 100:
        raise ConnectError("invalid_argument", "pageSize must be between 1 and 100")
    token = query.get("token") or pagination.get("token") or ""
    try:
        offset = int(base64.urlsafe_b64decode(token.encode()).decode() or 0) if token else 0
    except ValueError:
        raise ConnectError("invalid_argument", "invalid page token") from None
    chunk = all_items[offset : offset + size]
    answer: dict[str, Any] = {key: chunk} if chunk else {}
    if offset + size < len(all_items):
        answer["pagination"] = {"nextToken": base64.urlsafe_b64encode(str(offset + size).encode()).decode()}
    return orjson.dumps(answer)
