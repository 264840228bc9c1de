"""Fine-tune the base encoder for two-way sentiment on the CPU."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from models import cpus  # noqa: E402
from models.classifier import new_classifier  # noqa: E402
from models.data import LABELS, Example  # noqa: E402
from models.tokens import head_and_tail, quiet_transformers  # noqa: E402

ID2LABEL = dict(enumerate(LABELS))


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are the full build's."""

    epochs: float = 2.0
    batch_size: int = 64
    max_length: int = 64
    learning_rate: float = 1.4e-4
    weight_decay: float = 0.01
    warmup_share: float = 0.06
    max_steps: int | None = None
    max_examples: int | None = None
    seed: int = 13
    threads: int = field(default_factory=lambda: cpus.available().cpus)
    # "bf16" runs the forward pass under bfloat16 autocast (weights and optimizer stay fp32),
    # "auto" does so where the CPU computes in bfloat16 natively (AVX512-BF16, AMX).
    precision: str = "auto"
    # Whether the word-embedding matrix (11.7M of the encoder's 22.7M weights) stays as
    # pre-trained; training it costs a little time per step for accuracy (docs/decisions.md, "Two
    # epochs in the build's time").
    freeze_word_embeddings: bool = False
    # A text longer than max_length keeps its first head_tokens and its last tokens (as served).
    head_tokens: int = 16
    # The saved weights are the mean of snapshots taken every average_every steps over the last
    # average_share of training (0 keeps the final weights).
    average_share: float = 0.25
    average_every: int = 25
    # Batches are drawn from pools of this many batches sorted by length: near-equal lengths
    # in a batch halved the time per step here against random batches (less padding).
    length_group_batches: int = 64


def bf16_native() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_native() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(lengths: list[int], cfg: TrainConfig, rng: random.Random) -> list[list[int]]:
    """Index batches of similar lengths, in random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = cfg.batch_size * cfg.length_group_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
    rng.shuffle(batches)
    return batches


def load_base(encoder_dir: Path):
    """Tokenizer and a fresh two-label classifier on top of the base encoder (models/classifier.py)."""
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    model = new_classifier(
        encoder_dir, num_labels=len(LABELS), id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    return tokenizer, model


def train(encoder_dir: Path, examples: list[Example], cfg: TrainConfig, out_dir: Path) -> dict:
    """Fine-tune, save weights and tokenizer to `out_dir`, and return training statistics."""
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    if cfg.max_examples is not None and cfg.max_examples < len(examples):
        examples = rng.sample(examples, cfg.max_examples)
    tokenizer, model = load_base(encoder_dir)
    encoded = [
        head_and_tail(ids, cfg.max_length, cfg.head_tokens)
        for ids in tokenizer([ex.text for ex in examples], verbose=False)["input_ids"]
    ]
    labels = [LABELS.index(ex.label) for ex in examples]
    lengths = [len(ids) for ids in encoded]

    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = max(1, int(total * cfg.warmup_share))
    precision = resolve_precision(cfg.precision)
    if cfg.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable_weights = [p for _, p in trainable]
    no_decay = ("bias", "LayerNorm.weight")
    params = [
        {"params": [p for n, p in trainable if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))),
    )

    average_from = total - int(total * cfg.average_share) if cfg.average_share > 0 else None
    averaged: dict[str, torch.Tensor] = {}
    snapshots = 0

    model.train()
    started = time.perf_counter()
    step, running = 0, 0.0
    bar = tqdm(total=total, desc="fine-tuning", unit="step", dynamic_ncols=True)
    while step < total:
        for batch in length_grouped_batches(lengths, cfg, rng):
            if step >= total:
                break
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            target = torch.tensor([labels[i] for i in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**inputs, labels=target).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_weights, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
            if average_from is not None and step >= average_from and (total - step) % cfg.average_every == 0:
                snapshots += 1
                with torch.no_grad():
                    for name, p in trainable:
                        if name in averaged:
                            averaged[name] += (p.detach() - averaged[name]) / snapshots
                        else:
                            averaged[name] = p.detach().clone()
    bar.close()
    elapsed = time.perf_counter() - started
    if snapshots:
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(averaged[name])

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {
        "config": asdict(cfg),
        "precision": precision,
        "examples": len(examples),
        "steps": step,
        "seconds": round(elapsed, 1),
        "seconds_per_step": round(elapsed / max(1, step), 3),
        "final_loss": round(running, 4),
        "averaged_snapshots": snapshots,
    }
