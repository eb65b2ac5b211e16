"""``citrus-v data stats`` counts image references and distinct image files apart."""

from __future__ import annotations

import json
import os

import numpy as np
from nibabel.testing import data_path
from PIL import Image

from citrus_v.cli import main


def test_stats_tells_image_references_from_distinct_files(tmp_path, capsys):
    Image.fromarray(np.full((48, 64), 90, np.uint8)).save(tmp_path / "scan.png")
    volume = os.path.join(data_path, "anatomical.nii")  # nibabel's own test volume
    questions = [("scan.png", "Is this a CT?"), ("scan.png", "Is there a lesion?"), ("scan.png", "Which organ?"),
                 (f"{volume}#slice=10", "Is this an MR?"), (f"{volume}#slice=20", "Is this an MR?")]
    rows = [{"messages": [{"role": "user", "content": "<image>" + q}, {"role": "assistant", "content": "yes"}],
             "images": [image]} for image, q in questions]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "5 row(s) ok, 0 rejected" in out
    # five rows name an image, but they name only two files: one PNG three times, two slices of one volume
    assert "image references 5 (distinct image files 2), masks 0" in out
