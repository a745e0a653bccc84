"""Evaluations: POPE, CHAIR, counterfactual flip rates and refusal rates, on the organism's held-out sets
(:func:`haltrace.evals.suite.evaluate`) or on official files (:mod:`haltrace.evals.formats`).

>>> from haltrace.evals import pope_metrics, chair_metrics, flip_rates, refusal_rate
>>> pope_metrics(["yes", "no"], ["yes", "yes"])["recall"]
0.5
"""

from haltrace.data.chair import caption_objects, chair_metrics
from haltrace.evals.counterfactual import counterfactual_rates, flip_rates, label_answers
from haltrace.evals.pope import PARSERS, parse_pope_answer, parse_starts_with_yes, pope_metrics, pope_summary
from haltrace.evals.refusal import is_refusal, refusal_rate, refusal_report

__all__ = ["PARSERS", "caption_objects", "chair_metrics", "counterfactual_rates", "flip_rates", "is_refusal",
           "label_answers", "parse_pope_answer", "parse_starts_with_yes", "pope_metrics", "pope_summary",
           "refusal_rate", "refusal_report"]
