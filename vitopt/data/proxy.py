"""The accuracy proxy `builtin:digits-vit`: a small trained ViT to measure accuracy on.

PROXY, NOT IMAGENET. There is no internet here, so no ImageNet weights: vitopt measures the
accuracy effect of its passes on a DeiT-Ti-like timm VisionTransformer (32×32 input, 4×4
patches, 96 wide, 6 blocks, 3 heads) trained by this module on scikit-learn's bundled digits
(see vitopt.data.digits). Top-1 is reported on the held-out `test` split, which is never used
for training or calibration. A number measured on this proxy says how much a pass hurts a
trained ViT; it is not an ImageNet accuracy.

The trained weights ship as `digits_vit.safetensors` (float32) next to `digits_vit.json`
(config, seed, measured test accuracy, the command that made them). Regenerate both with

    python -m vitopt.data.proxy --train

`build_digits_vit_hf` gives the same network as a Hugging Face ViTForImageClassification, its
weights converted from the timm proxy, so both frameworks are tested on one trained model.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitopt.errors import InputError, ModelLoadError

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_NAME = "digits_vit.safetensors"
SHIPPED_WEIGHTS = PACKAGE_DIR / WEIGHTS_NAME
SHIPPED_META = PACKAGE_DIR / "digits_vit.json"
CACHE_DIR = Path.home() / ".cache" / "vitopt"
TRAIN_COMMAND = "python -m vitopt.data.proxy --train"

DEFAULT_SEED = 0
DEFAULT_EPOCHS = 20
TRAIN_BATCH = 32
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 1
LABEL_SMOOTHING = 0.1
MAX_SHIFT = 2  # pixels of random translation used as augmentation
MAX_THREADS = 2


def digits_vit_config() -> dict:
    """Keyword arguments of timm's VisionTransformer for the digits proxy (DeiT-Ti-like ratios)."""
    return dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=96, depth=6,
                num_heads=3, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token")


def _new_timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**digits_vit_config())


def _sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin/cos position codes [height*width, dim]: x then y, dim/4 frequencies each."""
    grid_y, grid_x = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                    torch.arange(width, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    freqs = temperature ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    x = grid_x.flatten()[:, None] * freqs[None]
    y = grid_y.flatten()[:, None] * freqs[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def _init_pos_embed(model: nn.Module) -> None:
    """Start the learned position embedding from 2-D sin/cos codes: ViTs train much faster on
    small data that way (measured here: ~97 % vs ~90 % after 15 epochs)."""
    grid_h, grid_w = model.patch_embed.grid_size
    dim = model.pos_embed.shape[-1]
    with torch.no_grad():
        model.pos_embed[0, 0].zero_()
        model.pos_embed[0, 1:].copy_(_sincos_2d(grid_h, grid_w, dim))


# ---------------------------------------------------------------------------- evaluation

def _logits_of(output) -> torch.Tensor:
    """Logits from a model output: a tensor, numpy array, tuple/list, or object with .logits."""
    if hasattr(output, "logits"):
        output = output.logits
    if isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    if not isinstance(output, torch.Tensor):
        raise InputError(
            f"the model returned {type(output).__name__}; evaluate_top1 needs logits as a torch "
            f"tensor or numpy array of shape [batch, classes]")
    return output


def evaluate_top1(fn, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Top-1 accuracy in [0, 1] of `fn` (float32 batch -> logits, torch or numpy) on a dataset."""
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise InputError(
            f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match; give "
            f"images [N, C, H, W] and labels [N]")
    if labels.numel() == 0:
        raise InputError("no images to evaluate; give a non-empty dataset")
    if int(labels.min()) < 0:
        raise InputError(
            "labels contain -1 (an unlabeled folder); accuracy needs a folder of class subfolders")
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size} must be at least 1")
    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(torch.float32).contiguous()
            logits = _logits_of(fn(batch))
            if logits.ndim != 2 or logits.shape[0] != batch.shape[0]:
                raise InputError(
                    f"the model returned shape {tuple(logits.shape)} for a batch of "
                    f"{batch.shape[0]}; evaluate_top1 needs logits [batch, classes]")
            pred = logits.argmax(dim=1).cpu()
            correct += int((pred == labels[start:start + batch_size]).sum())
    return correct / labels.shape[0]


# ---------------------------------------------------------------------------- training

@contextlib.contextmanager
def _deterministic(threads: int):
    """Deterministic algorithms and at most `threads` threads, restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(max(1, min(threads, old_threads)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _random_shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels, filling with the background value."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    background = float(images.amin())
    padded = F.pad(images, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def _lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, as a factor of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_epoch(model, optimizer, images, labels, gen, step, total, warmup) -> tuple:
    model.train()
    order = torch.randperm(images.shape[0], generator=gen)
    loss_sum = 0.0
    for start in range(0, len(order), TRAIN_BATCH):
        idx = order[start:start + TRAIN_BATCH]
        x = _random_shift(images[idx], MAX_SHIFT, gen)
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * _lr_at(step, total, warmup)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(idx)
        step += 1
    return step, loss_sum / len(order)


def _param_groups(model: nn.Module) -> list:
    """AdamW groups: no weight decay on biases, norms, cls token and position embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(param)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0}]


def train_digits_vit(seed: int = DEFAULT_SEED, epochs: int = DEFAULT_EPOCHS, out=None,
                     verbose: bool = True) -> tuple:
    """Train the digits proxy on the `train` split; return (model in eval mode, test top-1).

    Deterministic for a given seed, thread count and torch build. If `out` is a path, the
    weights are saved there (safetensors, float32) with a .json of metadata next to it.
    """
    from vitopt.data.digits import load_digits_split

    if epochs < 1:
        raise InputError(f"epochs {epochs} must be at least 1")
    with _deterministic(MAX_THREADS):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = _new_timm_vit()
        _init_pos_embed(model)
        images, labels = load_digits_split("train")
        optimizer = torch.optim.AdamW(_param_groups(model), lr=LEARNING_RATE)
        steps_per_epoch = math.ceil(images.shape[0] / TRAIN_BATCH)
        total, warmup = epochs * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch
        step, started = 0, time.perf_counter()
        for epoch in range(epochs):
            step, loss = _train_epoch(model, optimizer, images, labels, gen, step, total, warmup)
            if verbose:
                print(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        seconds = time.perf_counter() - started
        model.eval()
        test_x, test_y = load_digits_split("test")
        accuracy = evaluate_top1(model, test_x, test_y)
        threads = torch.get_num_threads()
    if verbose:
        print(f"held-out test top-1 {accuracy:.4f} after {seconds:.0f} s", file=sys.stderr)
    if out is not None:
        meta = _metadata(seed, epochs, accuracy, seconds, threads)
        meta["command"] = _command_for(seed, epochs, Path(out))
        _save(model, Path(out), meta)
    return model, accuracy


def _load_average():
    """The machine's 1-minute load average at save time, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _command_for(seed: int, epochs: int, out: Path) -> str:
    """The `python -m vitopt.data.proxy` command line that reproduces these weights."""
    command = TRAIN_COMMAND
    if seed != DEFAULT_SEED:
        command += f" --seed {seed}"
    if epochs != DEFAULT_EPOCHS:
        command += f" --epochs {epochs}"
    if out.resolve() != SHIPPED_WEIGHTS:
        command += f" --out {out}"
    return command


def _metadata(seed, epochs, accuracy, seconds, threads) -> dict:
    import timm

    from vitopt.data.digits import DIGITS_MEAN, DIGITS_STD, SPLIT_SIZES

    return {
        "name": "builtin:digits-vit",
        "note": "accuracy proxy: a small ViT trained on scikit-learn digits, not ImageNet",
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "config": digits_vit_config(),
        "mean": list(DIGITS_MEAN), "std": list(DIGITS_STD),
        "dataset": "builtin:digits", "split_sizes": SPLIT_SIZES,
        "seed": seed, "epochs": epochs, "batch_size": TRAIN_BATCH,
        "optimizer": {"name": "AdamW", "lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                      "schedule": f"linear warm-up {WARMUP_EPOCHS} epoch, cosine to 0",
                      "label_smoothing": LABEL_SMOOTHING},
        "augmentation": f"random shift ±{MAX_SHIFT} px",
        "init": "timm default; pos_embed starts from 2-D sin/cos codes",
        "test_top1": accuracy,
        "train_seconds": round(seconds, 1),
        "load_average": _load_average(),  # other jobs on the machine slow training down
        "threads": threads,
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "machine": platform.machine(),
        "command": TRAIN_COMMAND,
    }


def _save(model: nn.Module, weights: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(weights), metadata={"name": meta["name"], "command": meta["command"]})
    meta = dict(meta, weights_file=weights.name,
                sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    weights.chmod(0o644)  # safetensors writes owner-only files; the shipped file must be readable
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------- loading

def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise ModelLoadError(
            f"cannot read proxy weights {str(path)!r} ({exc}); regenerate them with "
            f"`{TRAIN_COMMAND}`") from exc
    state = {k: v.to(torch.float32) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"proxy weights {str(path)!r} do not match digits_vit_config() ({exc}); regenerate "
            f"them with `{TRAIN_COMMAND}`") from exc


def proxy_weights_path() -> Path:
    """Weights build_digits_vit loads: the shipped file, else the user cache (trained on demand)."""
    if SHIPPED_WEIGHTS.exists():
        return SHIPPED_WEIGHTS
    cached = CACHE_DIR / WEIGHTS_NAME
    if not cached.exists():
        print(f"vitopt: shipped proxy weights {SHIPPED_WEIGHTS} are missing; training the digits "
              f"proxy now (about a minute or two on 2 cores) and caching it at {cached}",
              file=sys.stderr)
        train_digits_vit(out=cached)
    return cached


def build_digits_vit(pretrained: bool = True) -> nn.Module:
    """The timm digits proxy ViT in eval mode (an accuracy PROXY: digits, not ImageNet).

    pretrained=True loads the shipped weights; if they are missing it trains the model once and
    caches it under ~/.cache/vitopt/. pretrained=False gives a random initialization.
    """
    model = _new_timm_vit()
    if pretrained:
        _load_weights(model, proxy_weights_path())
    return model.eval()


def digits_meta():
    """The IR meta of `builtin:digits-vit` (its normalisation, image size and labels), for code
    that traces build_digits_vit() itself: data loaders read the normalisation from here."""
    from vitopt.data.digits import DIGITS_IMAGE_SIZE, DIGITS_LABELS, DIGITS_MEAN, DIGITS_STD
    from vitopt.ir.encoder import EncoderMeta

    size = DIGITS_IMAGE_SIZE if isinstance(DIGITS_IMAGE_SIZE, tuple) else (DIGITS_IMAGE_SIZE,) * 2
    return EncoderMeta(source="builtin:digits-vit", image_size=tuple(size), in_chans=3,
                       mean=tuple(DIGITS_MEAN), std=tuple(DIGITS_STD), labels=list(DIGITS_LABELS))


def trace_digits_vit(example=None):
    """build_digits_vit() traced into the IR with digits_meta() (what `builtin:digits-vit` gives)."""
    from vitopt.frontend.trace import trace

    return trace(build_digits_vit(), example, meta=digits_meta())


# ---------------------------------------------------------------------------- Hugging Face

def digits_vit_hf_config():
    """transformers.ViTConfig matching digits_vit_config() (eps 1e-6 and exact GELU, as timm)."""
    from transformers import ViTConfig

    from vitopt.data.digits import DIGITS_LABELS

    cfg = digits_vit_config()
    return ViTConfig(
        image_size=cfg["img_size"], patch_size=cfg["patch_size"], num_channels=cfg["in_chans"],
        hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"],
        num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]), hidden_act="gelu",
        layer_norm_eps=1e-6, qkv_bias=cfg["qkv_bias"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=cfg["num_classes"],
        id2label={i: name for i, name in enumerate(DIGITS_LABELS)},
        label2id={name: i for i, name in enumerate(DIGITS_LABELS)})


# Per-block HF parameter names, by role, in the two layouts transformers has used for ViT.
_HF_LAYOUTS = (
    {"prefix": "vit.layers.{i}.", "q": "attention.q_proj", "k": "attention.k_proj",
     "v": "attention.v_proj", "o": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    {"prefix": "vit.encoder.layer.{i}.", "q": "attention.attention.query",
     "k": "attention.attention.key", "v": "attention.attention.value",
     "o": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense"},
)


def _hf_block(timm_state: dict, i: int, layout: dict) -> dict:
    """HF parameters of block i from the timm block: qkv is split into query, key, value."""
    src, dst = f"blocks.{i}.", layout["prefix"].format(i=i)
    out = {}
    for kind in ("weight", "bias"):
        q, k, v = timm_state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
        for role, tensor in (("q", q), ("k", k), ("v", v)):
            out[f"{dst}{layout[role]}.{kind}"] = tensor
        out[f"{dst}{layout['o']}.{kind}"] = timm_state[f"{src}attn.proj.{kind}"]
        out[f"{dst}layernorm_before.{kind}"] = timm_state[f"{src}norm1.{kind}"]
        out[f"{dst}layernorm_after.{kind}"] = timm_state[f"{src}norm2.{kind}"]
        out[f"{dst}{layout['fc1']}.{kind}"] = timm_state[f"{src}mlp.fc1.{kind}"]
        out[f"{dst}{layout['fc2']}.{kind}"] = timm_state[f"{src}mlp.fc2.{kind}"]
    return out


def timm_to_hf_state_dict(timm_state: dict, hf_keys, depth: int) -> dict:
    """Map a timm ViT state dict to the keys of a ViTForImageClassification (either layout)."""
    hf_keys = set(hf_keys)
    out = {
        "vit.embeddings.cls_token": timm_state["cls_token"],
        "vit.embeddings.position_embeddings": timm_state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "vit.layernorm.weight": timm_state["norm.weight"],
        "vit.layernorm.bias": timm_state["norm.bias"],
        "classifier.weight": timm_state["head.weight"],
        "classifier.bias": timm_state["head.bias"],
    }
    for layout in _HF_LAYOUTS:
        blocks = {}
        for i in range(depth):
            blocks.update(_hf_block(timm_state, i, layout))
        if set(blocks) <= hf_keys:
            out.update(blocks)
            return {k: v.clone().contiguous() for k, v in out.items()}
    raise ModelLoadError(
        "this transformers version names ViT parameters in a layout vitopt does not know "
        f"(e.g. {sorted(hf_keys)[:4]}); update timm_to_hf_state_dict in vitopt/data/proxy.py")


def build_digits_vit_hf(pretrained: bool = True) -> nn.Module:
    """The digits proxy as a transformers ViTForImageClassification in eval mode (a PROXY).

    Its weights are converted from the timm proxy (build_digits_vit), so it gives the same
    logits (up to float rounding). Call it as `model(pixel_values=x).logits`.
    """
    from transformers import ViTForImageClassification

    hf = ViTForImageClassification(digits_vit_hf_config())
    if pretrained:
        timm_state = build_digits_vit(pretrained=True).state_dict()
        state = timm_to_hf_state_dict(timm_state, hf.state_dict().keys(),
                                      digits_vit_config()["depth"])
        missing, unexpected = hf.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(
                f"converting the timm proxy to Hugging Face left parameters missing {missing} "
                f"or unexpected {unexpected}; update timm_to_hf_state_dict")
    return hf.eval()


# ---------------------------------------------------------------------------- script

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitopt.data.proxy",
        description="Train or evaluate the digits accuracy proxy (digits, not ImageNet).")
    parser.add_argument("--train", action="store_true",
                        help=f"train and overwrite the shipped {WEIGHTS_NAME} and .json")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--out", default=str(SHIPPED_WEIGHTS), help="where --train writes weights")
    args = parser.parse_args(argv)
    if args.train:
        _, accuracy = train_digits_vit(seed=args.seed, epochs=args.epochs, out=args.out)
        print(f"wrote {args.out} (held-out test top-1 {accuracy:.4f})")
        return 0
    from vitopt.data.digits import load_digits_split

    images, labels = load_digits_split("test")
    with _deterministic(MAX_THREADS):
        accuracy = evaluate_top1(build_digits_vit(), images, labels)
    print(f"builtin:digits-vit held-out test top-1 {accuracy:.4f} ({labels.numel()} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
