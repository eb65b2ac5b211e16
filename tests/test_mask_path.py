"""One ``[SEG]`` -> mask path: training's forward and the predictor decode the same hidden states into the
same masks (both go through ``CitrusV.decode_masks``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.dataset import RowDataset
from citrus_v.infer import CitrusVPredictor
from citrus_v.recipes.demo import shipped_base


def test_training_and_the_predictor_give_the_same_masks_for_the_same_states(tmp_path):
    predictor = CitrusVPredictor.from_pretrained(shipped_base())
    model, processor = predictor.model, predictor.processor
    write_corpus(tmp_path, CorpusOptions(n=6, seed=4242))
    dataset = RowDataset.from_jsonl([tmp_path / "train.jsonl"], processor)
    rows = [r.row for r in dataset.records]
    index = next(i for i, r in enumerate(rows) if r["messages"][-1]["content"].count("[SEG]") >= 2)
    sample = dataset[index]["sample"]
    image, answer = sample["images"][0], sample["messages"][-1]["content"]
    batch = processor([sample])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    states = model.seg_states(batch["input_ids"], out.last_hidden_state)[0]
    count = answer.count("[SEG]")
    assert states.shape[0] == count
    request = processor([{**sample, "messages": sample["messages"][:1]}], add_generation_prompt=True,
                        padding_side="left", return_labels=False)
    masks = predictor._masks(0, list(states), [image], request, answer)
    height, width = image.height, image.width
    upsampled = F.interpolate(out.pred_masks[0][:, None].float(), size=(height, width), mode="bilinear")
    expected = (upsampled[:, 0].sigmoid() > predictor.mask_threshold).numpy()
    assert len(masks) == count
    assert any(result.mask.any() for result in masks)  # the trained base draws something
    for k, result in enumerate(masks):
        assert np.array_equal(result.mask, expected[k])
        assert result.score == float(out.iou_scores[0][k])
