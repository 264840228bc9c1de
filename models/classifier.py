"""The sentiment classifier: the base encoder, the mean of its token vectors, a linear layer.

The base encoder (all-MiniLM-L6-v2) was trained as a sentence encoder whose sentence vector is
the mean of its token vectors; transformers' `BertForSequenceClassification` classifies the
[CLS] token's vector through a pooler layer instead. The mean learns quicker (docs/decisions.md,
"The mean of the token vectors, not the [CLS] token"). A folder's config.json says which head its weights
are for (`classifier_pooling`); folders without it are [CLS] models and load as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

POOLING_KEY = "classifier_pooling"
MEAN = "mean"


class MeanPooledClassifier(BertPreTrainedModel):
    """A BERT encoder without its pooler, the attention-masked mean of its last hidden states,
    dropout and a linear layer; the inputs, outputs and weight names of
    `BertForSequenceClassification`, less the pooler's."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        if input_ids is None:
            raise ValueError("the classifier takes input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def new_classifier(encoder_dir: Path, **settings: Any) -> PreTrainedModel:
    """A fresh mean-pooled classifier on the base encoder's weights (`settings`: its config's
    labels); the head is recorded in its config for `load_classifier`."""
    config = AutoConfig.from_pretrained(str(encoder_dir), **settings)
    setattr(config, POOLING_KEY, MEAN)
    return MeanPooledClassifier.from_pretrained(str(encoder_dir), config=config)


def load_classifier(model_dir: Path, **kwargs: Any) -> PreTrainedModel:
    """A fine-tuned classifier folder, with the head its config.json names ([CLS] when none)."""
    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, POOLING_KEY, None) == MEAN:
        return MeanPooledClassifier.from_pretrained(str(model_dir), **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kwargs)
