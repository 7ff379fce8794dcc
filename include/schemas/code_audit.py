"""Findings of a code review of one source file (the ``weekly_code_audit`` pipeline's output model)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Severity(StrEnum):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Finding(BaseModel):
    """One issue at one line."""

    model_config = ConfigDict(extra="forbid")

    severity: Severity
    line: int = Field(description="1-based line number the finding is about")
    issue: str = Field(description="what is wrong, in one sentence")
    suggestion: str = Field(description="how to fix it, in one sentence")


class CodeAuditResult(BaseModel):
    """All findings for one file; an empty list means nothing worth reporting."""

    model_config = ConfigDict(extra="forbid")

    findings: list[Finding]
