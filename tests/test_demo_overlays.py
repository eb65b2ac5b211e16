"""The demo's detection overlay draws what the model wrote, whichever order its box corners come in."""

from __future__ import annotations

import numpy as np
from PIL import Image

from citrus_v.recipes.demo import _overlay_boxes


def test_box_overlay_draws_boxes_with_corners_in_any_order(tmp_path):
    image = Image.new("L", (96, 96), 0)
    record = {
        "reference": {"boxes": [[10, 30, 30, 50]]},
        # the second corner above and left of the first, as a tiny model sometimes writes it
        "parsed": {"boxes": [[80, 82, 56, 60]]},
    }
    out = tmp_path / "det.png"
    _overlay_boxes(record, image, out)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert (pixels[30, 10:31] == (0, 255, 0)).all()  # the truth's top edge, green
    assert (pixels[60, 56:81] == (255, 0, 0)).all()  # the prediction's top edge, red
    assert (pixels[82, 56:81] == (255, 0, 0)).all()  # and its bottom edge
