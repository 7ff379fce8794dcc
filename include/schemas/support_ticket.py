"""Structured extraction from one support ticket (the ``bulk_extraction`` pipeline's output model)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Category(StrEnum):
    BILLING = "billing"
    BUG = "bug"
    ACCOUNT = "account"
    FEATURE_REQUEST = "feature_request"
    SHIPPING = "shipping"
    HOW_TO = "how_to"
    OTHER = "other"


class Priority(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    URGENT = "urgent"


class Sentiment(StrEnum):
    NEGATIVE = "negative"
    NEUTRAL = "neutral"
    POSITIVE = "positive"


class SupportTicketExtraction(BaseModel):
    """What the support team needs from a ticket, in a fixed shape."""

    model_config = ConfigDict(extra="forbid")

    category: Category = Field(description="the main topic of the ticket")
    priority: Priority = Field(description="how soon the customer needs an answer")
    sentiment: Sentiment = Field(description="the customer's tone")
    summary: str = Field(description="one or two sentences, in English, without personal data")
    product: str | None = Field(description="the product the ticket is about, if named")
