"""The documented answer extractor, and how unparsable answers are scored and counted."""

from __future__ import annotations

import pytest

from citrus_v.eval import answers
from citrus_v.eval.backends import ModelOutput
from citrus_v.eval.samples import EvalSample
from citrus_v.eval.scoring import score
from citrus_v.eval.summary import summarize

OPTIONS = {"A": "Pneumonia", "B": "Pleural effusion", "C": "Normal chest", "D": "Lung nodule"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(b)", "B"),
        ("B.", "B"),
        ("C. Normal chest", "C"),
        ("The answer is (D).", "D"),
        ("The answer is D because of the opacity", "D"),
        ("Answer: a", "A"),
        ("answer: b. the fluid", "B"),
        ("<think>fluid in the costophrenic angle</think><answer>B</answer>", "B"),
        ("pleural effusion", "B"),
        ("I think it shows a lung nodule in the right upper lobe.", "D"),
        ("The answer is a lesion of unclear kind", None),  # "a" here is an article, not option A
        ("pneumonia or a lung nodule", None),  # two options named: no choice
        ("", None),
    ],
)
def test_multiple_choice_extraction(text, expected):
    assert answers.extract_option(answers.answer_span(text), OPTIONS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("Yes, there is a lesion.", "yes"),
        ("No.", "no"),
        ("<answer>no</answer>", "no"),
        ("There is no lesion", "no"),
        ("The answer is yes", "yes"),
        ("maybe", None),
        ("yes and no", "yes"),  # the first word decides
        ("Maybe yes, maybe no", None),  # both appear, neither first
    ],
)
def test_yes_no_extraction(text, expected):
    assert answers.extract_yes_no(answers.answer_span(text)) == expected


def test_answer_span_rules():
    assert answers.answer_span("<think>a</think><answer> left </answer>") == "left"
    assert answers.answer_span("<think>a</think> right") == "right"
    assert answers.answer_span("<answer>unclosed") == "unclosed"
    assert answers.answer_span("  plain ") == "plain"
    assert answers.tagged_answer("no tags") is None


def test_normalisation():
    assert answers.normalize("  The answer is: Two. ") == "2"
    assert answers.normalize("\"The Left\"") == "left"
    assert answers.normalize("ＣＴ") == "ct"  # NFKC


def test_score_closed_other_answers():
    assert answers.score_closed("Left.", "left").correct
    assert answers.score_closed("three", "3").correct
    assert not answers.score_closed("right", "left").correct
    empty = answers.score_closed("", "left")
    assert not empty.parsable and not empty.correct
    assert answers.score_closed("B", "B", OPTIONS).correct
    assert answers.score_closed("Pneumonia", "B", OPTIONS).value == "A"


def test_cot_format():
    assert answers.follows_cot_format("<think>looked</think>\n<answer>yes</answer>")
    assert not answers.follows_cot_format("<think></think><answer>yes</answer>")
    assert not answers.follows_cot_format("yes")
    assert not answers.follows_cot_format("<answer>yes</answer>")


def _sample(task: str, reference, **kw) -> EvalSample:
    return EvalSample(id=kw.pop("id", "s1"), task=task, prompt="<image>q", images=[], reference=reference,
                      source="test:1", groups={"dataset": "t"}, **kw)


def test_unparsable_answers_are_scored_wrong_and_counted():
    records = [
        score(_sample("vqa", "yes", answer_type="closed", id="a"), ModelOutput("perhaps")),
        score(_sample("vqa", "yes", answer_type="closed", id="b"), ModelOutput("Yes.")),
        score(_sample("vqa", "B", answer_type="closed", options=OPTIONS, id="c"), ModelOutput("no idea")),
        score(_sample("cot", "no", id="d"), ModelOutput("<think>x</think> no")),  # no <answer> tag
        score(_sample("cot", "no", id="e"), ModelOutput("<think>x</think><answer>No</answer>")),
        score(_sample("doc", '{"a": "1"}', answer_type="extraction", id="f"), ModelOutput("a is 1")),
    ]
    assert [r["status"] for r in records] == ["unparsable", "ok", "unparsable", "unparsable", "ok", "unparsable"]
    summary = summarize(records, ["vqa", "cot", "doc"])
    assert summary["vqa"]["counts"] == {"samples": 3, "scored": 3, "unparsable": 2, "failed": 0}
    assert summary["vqa"]["overall"]["closed_accuracy"] == pytest.approx(1 / 3)  # unparsable ones count as wrong
    assert summary["vqa"]["unparsable"] == ["a", "c"]
    assert summary["cot"]["overall"] == {"n": 2, "accuracy": 0.5, "format_share": 0.5}
    assert summary["doc"]["overall"]["field_em"] == 0.0 and summary["doc"]["counts"]["unparsable"] == 1


def test_detection_without_a_box_scores_zero_iou(monkeypatch):
    monkeypatch.setattr("citrus_v.eval.scoring.first_image_size", lambda sample: (100, 100))
    sample = _sample("det", [[10, 10, 50, 50]])
    missing = score(sample, ModelOutput("no box"))
    found = score(sample, ModelOutput("box", boxes=[[10, 10, 50, 50]]))
    assert missing["status"] == "unparsable" and missing["scores"] == {"iou": 0.0, "hit50": 0.0}
    assert found["status"] == "ok" and found["scores"] == {"iou": 1.0, "hit50": 1.0}
    summary = summarize([missing, found], ["det"])["det"]
    assert summary["overall"]["acc_iou50"] == 0.5 and summary["counts"]["unparsable"] == 1
