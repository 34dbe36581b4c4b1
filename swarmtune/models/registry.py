"""Which Family runs which Hugging Face `model_type`: the lookup over every family swarmtune ships."""

from __future__ import annotations

from swarmtune.errors import UserError
from swarmtune.models.bloom import BLOOM
from swarmtune.models.deepseek import DEEPSEEK_V3
from swarmtune.models.family import Family
from swarmtune.models.moe import GLM4_MOE, GPT_OSS, QWEN3_MOE
from swarmtune.models.rotary import LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3

FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, BLOOM, QWEN3_MOE, GLM4_MOE, GPT_OSS, DEEPSEEK_V3)}


class UnsupportedModel(UserError, ValueError):
    """The checkpoint's family is not one swarmtune can serve."""


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(model_type: str) -> Family:
    """The family for an HF `model_type`, or a clear error naming the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"Unsupported model_type {model_type!r}: swarmtune supports {', '.join(supported_model_types())}"
        ) from None
