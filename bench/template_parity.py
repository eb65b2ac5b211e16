"""Rows rendered by ms-swift itself and by Citrus-V, compared byte for byte.

ms-swift rows name their objects once (``"objects": {"ref": [...], "bbox": [...]}``) and mark where they go
with ``<ref-object>`` / ``<bbox>``. This script renders the same rows both ways and compares the whole
encoded conversation (``tokenizer.decode`` of the input ids: ChatML, image tokens, grounding text):

1. Builds (once) or reuses the peer environment of ``bench/peer_swift.py`` (``bench/.peer/venv``: ms-swift
   4.6.0 with its own torch and transformers) through that script's ``ensure_env``.
2. Writes one PNG per row at the row's image size, and (in the peer environment) the tiny Qwen2.5-VL
   checkpoint of ``bench/peer_swift.py``, whose tokenizer has Qwen2.5's special-token ids; both sides use it.
3. Rows: the fixed cases of ``tests/data/msswift_renderings.json`` plus ``--random`` generated ones (image
   sizes, fractional coordinates, refs with quotes and non-ASCII letters, several objects and turns, rows
   that write the JSON themselves, rows without an image).
4. ms-swift side, in the peer environment: ``get_template(processor, template_type="qwen2_5_vl")`` under
   ``QWENVL_BBOX_FORMAT=legacy`` (its default) and ``=new``, ``template.encode(row)``.
   Our side, in this environment: ``citrus_v.data.rows.render_objects`` with the styles ``qwen2_5_vl`` and
   ``qwen2_5_vl_new``, then our processor.
5. Prints ``N of N identical`` per style and the first difference; ``--write_fixture`` stores ms-swift's
   renderings of the fixed cases in the test file.

The ``citrus_v`` style (upstream Citrus-V's template: fenced JSON boxes) exists only in upstream's fork of
ms-swift 3.7, not in ms-swift: its expected renderings in the test file follow upstream's code (commit
d3bb13d) without its two defects, and are checked by ``tests/test_parity_mode.py``.

    python bench/template_parity.py [--random 200] [--seed 0] [--json FILE] [--write_fixture]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
FIXTURE = ROOT / "tests" / "data" / "msswift_renderings.json"
# ms-swift's QWENVL_BBOX_FORMAT for each of our styles that ms-swift itself has
SWIFT_FORMATS = {"qwen2_5_vl": "legacy", "qwen2_5_vl_new": "new"}
VISION = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
REFS = ["liver", "left kidney", "lesion", "Läsion", "肝脏", 'the "bright" spot', "a\\b", "nodule 2"]


# --- rows -----------------------------------------------------------------------------------------------------
def load_fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _random_box(rng: random.Random, width: int, height: int) -> list[float | int]:
    x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
    y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
    if rng.random() < 0.5:
        return [int(x1), int(y1), int(x2), int(y2)]
    return [round(v, rng.choice([1, 2, 3])) for v in (x1, y1, x2, y2)]


def random_case(rng: random.Random, index: int) -> dict:
    """One generated row: a layout of placeholders, its objects and an image size (or none)."""
    width, height = rng.randint(28, 900), rng.randint(28, 900)
    count = rng.randint(1, 3)
    refs = [rng.choice(REFS) for _ in range(count)]
    layout = rng.choice(["question", "pairs", "json", "turns", "no_image"])
    if layout == "question":  # the ref in the question, the boxes in the answer
        refs = refs[:1] * count
        messages = [("user", "<image>Find every <ref-object>."), ("assistant", "<bbox>" * count)]
    elif layout in ("pairs", "no_image"):
        answer = " and ".join("<ref-object><bbox>" for _ in range(count))
        messages = [("user", "<image>Describe the image." if layout == "pairs" else "Describe it."),
                    ("assistant", answer)]
    elif layout == "json":  # the row writes the JSON itself (Qwen's cookbook form)
        items = ",\n".join('{"bbox_2d": <bbox>,"label": "<ref-object>"}' for _ in range(count))
        messages = [("user", "<image>Locate the targets."), ("assistant", "```json\n[\n" + items + "\n]\n```")]
    else:  # one object per turn: the placeholders are filled in order across the conversation
        messages = []
        for k in range(count):
            messages += [("user", ("<image>" if k == 0 else "") + "Where is <ref-object>?"), ("assistant", "<bbox>")]
    row = {"messages": [{"role": r, "content": c} for r, c in messages],
           "objects": {"ref": refs, "bbox": [_random_box(rng, width, height) for _ in range(count)]}}
    return {"name": f"random-{index}-{layout}", "image_size": None if layout == "no_image" else [width, height],
            "row": row}


def cases_for(args: argparse.Namespace, fixture: dict) -> list[dict]:
    rng = random.Random(args.seed)
    return json.loads(json.dumps(fixture["cases"])) + [random_case(rng, k) for k in range(args.random)]


def write_images(cases: list[dict], folder: Path) -> None:
    """One black PNG per case at its image size; the row names it."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        if case.get("image_size"):
            width, height = case["image_size"]
            path = folder / f"{case['name']}.png"
            Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path)
            case["row"] = {**case["row"], "images": [str(path)]}


# --- the two sides ---------------------------------------------------------------------------------------------
def swift_side(work: Path) -> None:
    """In the peer environment: ms-swift's renderings of every case under each QWENVL_BBOX_FORMAT."""
    from peer_swift import write_qwen_checkpoint
    from swift import get_processor, get_template

    if not (work / "qwen" / "config.json").is_file():
        write_qwen_checkpoint(work / "qwen")  # its image processor needs torchvision, which the peer has
    cases = json.loads((work / "cases.json").read_text())
    processor = get_processor(str(work / "qwen"))
    out: dict[str, dict[str, str]] = {}
    for style, bbox_format in SWIFT_FORMATS.items():
        os.environ["QWENVL_BBOX_FORMAT"] = bbox_format  # read when the template is built, as ms-swift does
        template = get_template(processor, template_type="qwen2_5_vl")
        template.set_mode("train")
        out[style] = {}
        for case in cases:
            row = json.loads(json.dumps(case["row"]))  # ms-swift scales objects in place
            encoded = template.encode(row)
            out[style][case["name"]] = processor.tokenizer.decode(encoded["input_ids"])
    (work / "swift.json").write_text(json.dumps(out, ensure_ascii=False))


def our_processor(work: Path, min_pixels: int, max_pixels: int):
    """Our processor on the same tokenizer (plus Citrus-V's tokens) and pixel bounds."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from citrus_v.processing.processor import CitrusVProcessor
    from citrus_v.processing.tokenizer_builder import add_citrus_tokens

    tokenizer = AutoTokenizer.from_pretrained(work / "qwen")
    add_citrus_tokens(tokenizer)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return CitrusVProcessor(tokenizer, image_processor, min_pixels=min_pixels, max_pixels=max_pixels)


def our_side(cases: list[dict], processor, style: str) -> dict[str, str]:
    from citrus_v.data.rows import render_objects
    from citrus_v.processing.boxes import BoxScaler

    out = {}
    for case in cases:
        row = case["row"]
        scaler = BoxScaler.for_processor(processor, *case["image_size"]) if case.get("image_size") else None
        sample = {"messages": render_objects(row, scaler, style), "images": row.get("images") or []}
        encoded = processor(sample, return_labels=False)
        out[case["name"]] = processor.tokenizer.decode(encoded["input_ids"][0])
    return out


def messages_of(text: str) -> list[str]:
    """The message contents of an encoded conversation, each image block written back as ``<image>``."""
    contents = []
    for part in text.split("<|im_start|>")[1:]:
        body = part.split("\n", 1)[1] if "\n" in part else ""
        contents.append(VISION.sub("<image>", body.split("<|im_end|>", 1)[0]))
    return contents[1:]  # the system prompt is not the row's


# --- run -------------------------------------------------------------------------------------------------------
def compare(theirs: dict[str, str], ours: dict[str, str]) -> dict:
    same = [name for name in theirs if theirs[name] == ours.get(name)]
    differing = [name for name in theirs if name not in same]
    first = None
    if differing:
        name = differing[0]
        first = {"case": name, "ms_swift": theirs[name][-400:], "ours": ours.get(name, "")[-400:]}
    return {"identical": len(same), "total": len(theirs), "differing": differing, "first_difference": first}


def run_peer(work: Path, env_pixels: dict[str, str]) -> None:
    from peer_swift import PEER_PYTHON

    env = {**os.environ, **env_pixels, "PYTHONPATH": str(ROOT / "bench")}
    log = work / "swift.log"
    with open(log, "w") as handle:
        done = subprocess.run([str(PEER_PYTHON), __file__, "--swift_side", str(work)], env=env,
                              stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"the ms-swift side failed (exit {done.returncode}); its log: {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, default=200, help="generated rows besides the fixed cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated rows")
    parser.add_argument("--json", type=Path, help="also write the figures and differences to this JSON file")
    parser.add_argument("--write_fixture", action="store_true",
                        help="store ms-swift's renderings of the fixed cases in tests/data/msswift_renderings.json")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--min_pixels", type=int, help="MIN_PIXELS of both sides (default: the test file's)")
    parser.add_argument("--max_pixels", type=int, help="MAX_PIXELS of both sides (default: the test file's)")
    parser.add_argument("--swift_side", type=Path, help=argparse.SUPPRESS)  # the peer environment's half
    args = parser.parse_args()
    if args.swift_side:
        swift_side(args.swift_side)
        return

    from peer_swift import ensure_env

    versions = ensure_env()
    work = args.work or Path(tempfile.mkdtemp(prefix="template-parity-"))
    fixture = load_fixture()
    cases = cases_for(args, fixture)
    write_images(cases, work / "images")
    (work / "cases.json").write_text(json.dumps(cases, ensure_ascii=False))
    bounds = (args.min_pixels or fixture["min_pixels"], args.max_pixels or fixture["max_pixels"])
    if args.write_fixture and bounds != (fixture["min_pixels"], fixture["max_pixels"]):
        raise SystemExit("--write_fixture renders under the test file's own pixel bounds: drop --min/max_pixels")
    run_peer(work, {"MIN_PIXELS": str(bounds[0]), "MAX_PIXELS": str(bounds[1])})
    theirs = json.loads((work / "swift.json").read_text())
    processor = our_processor(work, *bounds)
    report = {"versions": versions, "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
              "rows": len(cases), "min_pixels": bounds[0], "max_pixels": bounds[1], "styles": {}}
    for style in SWIFT_FORMATS:
        result = compare(theirs[style], our_side(cases, processor, style))
        report["styles"][style] = result
        print(f"{style} (ms-swift QWENVL_BBOX_FORMAT={SWIFT_FORMATS[style]}): {result['identical']} of "
              f"{result['total']} rows identical", flush=True)
        if result["first_difference"]:
            print(json.dumps(result["first_difference"], ensure_ascii=False, indent=2))
    print(f"ms-swift {versions['ms-swift']} / transformers {versions['transformers']} (peer) against citrus-v "
          f"{versions['citrus-v']}; MIN_PIXELS={bounds[0]} MAX_PIXELS={bounds[1]}; work folder {work}")
    if args.write_fixture:
        for case in fixture["cases"]:
            for style in SWIFT_FORMATS:
                case["rendered"][style] = messages_of(theirs[style][case["name"]])
        FIXTURE.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
        print(f"wrote ms-swift's renderings of {len(fixture['cases'])} cases to {FIXTURE}")
    if args.json:
        args.json.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
