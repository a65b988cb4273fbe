"""Train the exit heads by self-distillation from the model's own final head; backbone frozen.

The backbone runs once, without gradients, over the training images; the token state after
each exit's block and the final logits are kept, and only the heads' parameters are trained on
those (so the backbone cannot change, and an epoch costs only the heads' FLOPs). Loss per head:
    alpha * T^2 * KL(softmax(final / T) || softmax(head / T)) + (1 - alpha) * CE(head, label)
or the distillation term alone when no labels are given (self-distillation as in LGViT, Xu et
al. 2023, §3.3, and BYOT, Zhang et al. 2019). AdamW with a cosine schedule, a fixed seed for
the shuffling and the heads' initial weights: the same data and seed give the same heads.
Runs on one thread: the heads' ops are small, and on a busy 2-core machine two threads made
each step 30-70x slower (threads waiting on each other) than one.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vitopt.errors import ConfigError, InputError
from vitopt.exits.segments import all_exit_logits
from vitopt.ir.exits import exit_stages
from vitopt.ir.state import TokenState

DEFAULT_EPOCHS = 8
DEFAULT_LR = 2e-3
TEMPERATURE = 2.0
ALPHA = 0.5
BATCH = 64


def check_labels(ir, labels: Optional[torch.Tensor], classes: Optional[int] = None) -> None:
    """The training labels must fit the heads: ConfigError when the data's classes differ."""
    heads = exit_stages(ir)
    if not heads:
        raise ConfigError("the IR has no exit heads to train; run the insert_exit_heads pass first")
    expected = heads[0].num_classes
    if classes is not None and classes != expected:
        raise ConfigError(f"the training data has {classes} classes but the model's head has "
                          f"{expected}; give data with the model's classes (one subfolder per "
                          f"class, in the model's label order)")
    if labels is not None and labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= expected):
        raise ConfigError(f"training labels span {int(labels.min())}..{int(labels.max())} but the "
                          f"model has {expected} classes (0..{expected - 1}); the data does not "
                          f"match the model's head")


def train_heads(ir, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, seed: int = 0,
                log: Optional[Callable[[str], None]] = None) -> dict:
    """Train the IR's exit heads in place; returns per-epoch losses and training agreement."""
    if epochs < 1:
        raise ConfigError(f"exit head training needs at least 1 epoch, got {epochs}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise InputError(f"exit head training needs images [N, C, H, W], got shape {list(images.shape)}")
    if labels is not None and (labels < 0).any():
        labels = None  # an unlabelled folder: distillation only
    check_labels(ir, labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(ir, images, labels, epochs, lr, seed, log or (lambda message: None))
    finally:
        torch.set_num_threads(threads)


def _train(ir, images, labels, epochs, lr, seed, log) -> dict:
    heads = exit_stages(ir)
    started = time.perf_counter()
    was_training = ir.training
    ir.eval()
    _, teacher, states = all_exit_logits(ir, images)
    log(f"exit heads: backbone features of {images.shape[0]} images in "
        f"{time.perf_counter() - started:.1f}s; training {len(heads)} heads for {epochs} epochs")
    params = [p for head in heads for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    steps, step, history = epochs * math.ceil(n / BATCH), 0, []
    for head in heads:
        head.train()
    for epoch in range(epochs):
        order, total = torch.randperm(n, generator=gen), 0.0
        for start in range(0, n, BATCH):
            index = order[start:start + BATCH]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = sum(_loss(head.logits(_take(state, index)), teacher[index],
                             labels[index] if labels is not None else None)
                       for head, state in zip(heads, states))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * index.numel()
            step += 1
        history.append(total / n / len(heads))
        log(f"exit heads: epoch {epoch + 1}/{epochs} loss {history[-1]:.4f}")
    for head in heads:
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
    ir.train(was_training)
    with torch.no_grad():
        agree = [float((head.logits(state).argmax(1) == teacher.argmax(1)).float().mean())
                 for head, state in zip(heads, states)]
    log(f"exit heads trained in {time.perf_counter() - started:.1f}s; agreement with the final "
        f"head on the training images: " + ", ".join(f"{a:.1%}" for a in agree))
    return {"epochs": epochs, "lr": lr, "seed": seed, "images": n, "labels": labels is not None,
            "loss": history, "train_agreement": agree, "seconds": time.perf_counter() - started}


def _take(state: TokenState, index: torch.Tensor) -> TokenState:
    return TokenState(state.x[index], size=state.size[index] if state.size is not None else None)


def _loss(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    distill = F.kl_div(F.log_softmax(student / TEMPERATURE, dim=1),
                       F.softmax(teacher / TEMPERATURE, dim=1), reduction="batchmean") * TEMPERATURE ** 2
    if labels is None:
        return distill
    return ALPHA * distill + (1 - ALPHA) * F.cross_entropy(student, labels)
