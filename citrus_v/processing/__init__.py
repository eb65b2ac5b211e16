"""Processor, chat template, tokens and image/mask inputs."""

from .processor import CitrusVProcessor, ProcessorError, Sample
from .template import IGNORE_INDEX, ChatTemplate, TemplateError

__all__ = ["IGNORE_INDEX", "ChatTemplate", "CitrusVProcessor", "ProcessorError", "Sample", "TemplateError"]
