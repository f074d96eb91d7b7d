"""Tinn et al.'s advice on which stabilizer to use, as one pure function.

Tinn, Cheng, Gu, Usuyama, Liu, Naumann, Gao and Poon, *Fine-tuning large neural language
models for biomedical natural language processing*, Patterns 4(4), 2023 (arXiv:2112.07869).
Their summary of findings, quoted beside the branch that applies it:

    "Specifically, freezing lower layers is helpful for standard BERT-BASE models, while
    layerwise decay is more effective for BERT-LARGE and ELECTRA models. For low-resource
    text similarity tasks, such as BIOSSES, reinitializing the top layers is the optimal
    strategy."

Precedence, where more than one finding applies: the task finding first (it is stated for
the task, as "the optimal strategy", whatever the model), then the model findings (ELECTRA or
large: layerwise decay; base-size BERT: freezing), then plain fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

LARGE_LAYERS = 24  # BERT-large and ELECTRA-large have 24 encoder layers
BASE_LAYERS = 12  # BERT-base has 12
# BERT checkpoints (PubMedBERT, BioBERT, SciBERT, BioLinkBERT) have model_type "bert". RoBERTa,
# DeBERTa, DistilBERT and ModernBERT were not studied, so freezing is not extrapolated to them.
BERT_TYPES = ("bert",)


@dataclass(frozen=True)
class Recommendation:
    """The stabilizer to apply (a ``conf/stabilizer`` option) and why, in a few words."""

    stabilizer: str
    reason: str

    def __str__(self) -> str:
        return f"recommended -> {self.stabilizer} ({self.reason})"


def recommend(model_type: str, num_layers: int, task_type: str, n_train: int,
              low_resource: int = 1000) -> Recommendation:
    """The stabilizer Tinn et al. (2021) found best for this model and task.

    ``n_train`` is the number of training examples; a similarity task with at most
    ``low_resource`` of them counts as low-resource (BIOSSES has 64 training pairs).

    >>> str(recommend("electra", 12, "ner", 5000))
    'recommended -> llrd (ELECTRA)'
    >>> recommend("bert", 12, "similarity", 64).stabilizer
    'reinit_top'
    """
    if task_type == "similarity" and n_train <= low_resource:
        # "For low-resource text similarity tasks, such as BIOSSES, reinitializing the top
        # layers is the optimal strategy."
        return Recommendation(
            "reinit_top",
            f"low-resource similarity: {n_train} training examples <= {low_resource}")
    electra, large = model_type == "electra", num_layers >= LARGE_LAYERS
    if electra or large:
        # "layerwise decay is more effective for BERT-LARGE and ELECTRA models"
        why = ["ELECTRA"] if electra else []
        why += [f"{num_layers} layers >= {LARGE_LAYERS}: large"] if large else []
        return Recommendation("llrd", ", ".join(why))
    if model_type in BERT_TYPES and num_layers >= BASE_LAYERS:
        # "freezing lower layers is helpful for standard BERT-BASE models"
        return Recommendation("freeze_lower", f"BERT, {num_layers} layers: base size")
    return Recommendation(
        "none", f"no finding applies to {model_type} with {num_layers} layers on {task_type}")
