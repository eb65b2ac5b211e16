"""Special tokens of Qwen2.5 and Citrus-V by text, and the label id the loss ignores.

Token ids always come from the tokenizer, never from here. This module imports nothing, so that every layer
(data rows, the processor, the model, the server, the evaluation) names a token the same way.
"""

from __future__ import annotations

# Qwen2.5's built-in special tokens, in id order (151643 ... 151664 in the real tokenizer).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

SEG_TOKEN = "[SEG]"
BBOX_START = "<bbox>"
BBOX_END = "</bbox>"
# Added after Qwen's last built-in token, as upstream's loader does (151665-151667 in the 8B tokenizer).
CITRUS_SPECIAL_TOKENS: tuple[str, ...] = (SEG_TOKEN, BBOX_START, BBOX_END)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # ms-swift's tag for one entry of a row's "videos"
VISION_PAD = "<|vision_pad|>"
# Tokens that structure the prompt (turns, image slots): only the chat template writes them, so text typed by a
# user or written in a dataset row may not hold them (they would forge turns or image slots). ``[SEG]`` and the
# grounding tokens may appear: answers hold them.
STRUCTURAL_TOKENS: tuple[str, ...] = (
    IM_START, IM_END, ENDOFTEXT, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD,
)
# Qwen2-VL's grounding tokens, around a label and a box: REF_START label REF_END BOX_START (x1,y1),(x2,y2) BOX_END
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
REF_START = "<|object_ref_start|>"
REF_END = "<|object_ref_end|>"
# ms-swift's grounding placeholders in dataset rows, filled from a row's ``objects``
REF_PLACEHOLDER = "<ref-object>"
BBOX_PLACEHOLDER = "<bbox>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# The label of a position the loss skips (system and user turns, role headers, padding): PyTorch's default.
IGNORE_INDEX = -100

# ChatML for string contents; ``<image>`` stays a placeholder that the template expands.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
