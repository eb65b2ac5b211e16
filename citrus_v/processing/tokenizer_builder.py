"""Build the tiny preset's tokenizer offline: a byte-level BPE with Qwen2's pre-tokenizer.

Digits are single tokens (as in Qwen), so coordinates tokenise the same way the real tokenizer does;
the special tokens are Qwen2.5's, in Qwen's order, followed by Citrus-V's ``[SEG]``, ``<bbox>``, ``</bbox>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..tokens import CHAT_TEMPLATE, CITRUS_SPECIAL_TOKENS, ENDOFTEXT, IM_END, QWEN_SPECIAL_TOKENS

# Qwen2's pre-tokenizer split (digits one at a time).
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ORGANS = (
    "liver spleen pancreas stomach heart lung lungs kidney kidneys bladder prostate uterus brain skull spine "
    "aorta colon bowel gallbladder thyroid breast bone rib ribs femur trachea esophagus adrenal vessel"
)
_FINDINGS = (
    "lesion lesions tumor tumour mass nodule cyst polyp fracture effusion pneumothorax edema hemorrhage "
    "infarct opacity consolidation calcification stenosis abnormality normal abnormal benign malignant"
)
_MODALITIES = "CT MRI MR X-ray ultrasound US PET endoscopy fundus dermoscopy DER pathology chest abdomen pelvis"
_WORDS = (
    "the a an of in on at to is are was were with without and or no yes not there this that it its which "
    "what where how many left right upper lower middle anterior posterior small large round dark bright "
    "image scan slice shows show seen visible present absent finding findings impression report patient "
    "segment locate detect describe answer question output bbox coordinates using JSON format please "
    "Sure, it is Here are mm cm size measures located near region area every each one two three "
    "label think answer document field value name date hospital diagnosis age sex male female"
)
_SNIPPETS = (
    "Sure, it is [SEG].",
    '```json\n[\n{"bbox_2d": [61,99,145,178],"label": "lesion"}\n]\n```',
    "<think>The image shows a bright region.</think><answer>yes</answer>",
    "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>",
    "Locate the lesion, output its bbox coordinates using JSON format.",
    "Is there a lesion in the image? Answer yes or no.",
    "Please segment the left kidney in this CT image.",
    "Findings: No acute abnormality. Impression: normal study.",
    "Patient name: Jane Doe. Age: 54. Date: 2024-03-01.",
)


def tiny_corpus() -> list[str]:
    """A small fixed text corpus covering the words and formats the tiny preset is trained on."""
    lines: list[str] = list(_SNIPPETS)
    for group in (_ORGANS, _FINDINGS, _MODALITIES, _WORDS):
        words = group.split()
        lines.append(" ".join(words))
        lines.extend(f"the {w} " for w in words)
        lines.extend(f"{w.capitalize()} " for w in words)
    lines.append(" ".join(str(i) for i in range(1000)))
    return lines * 4


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512, citrus_tokens: bool = True
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on ``corpus`` (the tiny corpus by default) and add the special tokens.

    ``citrus_tokens=False`` leaves out ``[SEG]``/``<bbox>``/``</bbox>``, as in a plain Qwen2.5 tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) if corpus is not None else tiny_corpus(), trainer=trainer)
    specials = list(QWEN_SPECIAL_TOKENS) + (list(CITRUS_SPECIAL_TOKENS) if citrus_tokens else [])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=specials,
        model_max_length=32768,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def add_citrus_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add ``[SEG]``, ``<bbox>``, ``</bbox>`` as special tokens where missing; return those added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in CITRUS_SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in missing]},
            replace_extra_special_tokens=False,
        )
    return missing
