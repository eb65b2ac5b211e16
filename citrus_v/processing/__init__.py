"""Processor, chat template, tokenizer set-up, boxes and image/mask inputs (token strings: :mod:`citrus_v.tokens`)."""

from .processor import CitrusVProcessor, ProcessorError, Sample
from .template import ChatTemplate, TemplateError

__all__ = ["ChatTemplate", "CitrusVProcessor", "ProcessorError", "Sample", "TemplateError"]
