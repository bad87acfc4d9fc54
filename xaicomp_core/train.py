"""Reproducible training of the built-in models on full Fashion-MNIST.

    python -m xaicomp_core.train fashion-vgg [--epochs N] [--seed 0] [--threads 2] [--source DIR]

Writes ``assets/models/<name>.safetensors`` and the model card ``assets/models/<name>.json`` (architecture,
parameter count, fp32 size, accuracy on the full 10k test set and on the shipped evaluation set, command, seed,
training time, machine). Seeded SGD with Nesterov momentum, one-cycle learning rate, weight decay 5e-4, batch 128,
random 2-pixel shifts and horizontal flips.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from xaicomp_core.io.data import FASHION_MNIST_CLASSES, find_fashion_mnist_raw, load_builtin_dataset, load_mnist_like
from xaicomp_core.io.models import BUILTIN_MODELS, FASHION_PREPROCESSING, MODELS_DIR, count_parameters


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts of up to ``pad`` pixels (zero-padded in normalised space) and random horizontal flips."""
    n, _, h, w = x.shape
    fill = float(-FASHION_PREPROCESSING.mean[0] / FASHION_PREPROCESSING.std[0])
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, int]:
    """Top-1 accuracy and number of correct predictions."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x), correct


def train(name: str, epochs: int | None = None, seed: int = 0, threads: int = 2, source: str | None = None,
          out_dir: pathlib.Path = MODELS_DIR, batch_size: int = 128, log=print) -> dict:
    """Train a built-in model and write its weights and card. Returns the card."""
    spec = BUILTIN_MODELS[name]
    epochs = epochs or spec.epochs
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    raw = find_fashion_mnist_raw(source)
    train_set = load_mnist_like(raw, True, FASHION_MNIST_CLASSES, "fashion-mnist/train")
    test_set = load_mnist_like(raw, False, FASHION_MNIST_CLASSES, "fashion-mnist/test")
    xtr, ytr = train_set.tensors(FASHION_PREPROCESSING)
    xte, yte = test_set.tensors(FASHION_PREPROCESSING)

    model = spec.factory()
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=spec.lr, momentum=0.9, nesterov=True)
    steps = epochs * ((len(xtr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            xb = augment(xtr[idx], gen)
            loss = nn.functional.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc, _ = accuracy(model, xte, yte)
        history.append({"epoch": epoch + 1, "loss": round(total / len(xtr), 4), "test_accuracy": acc})
        log(f"[{name}] epoch {epoch + 1}/{epochs} loss {total / len(xtr):.4f} test acc {acc:.4f} "
            f"({time.time() - t0:.0f}s)")
    seconds = time.time() - t0
    model.eval()

    from safetensors.torch import save

    from xaicomp_core.io.atomic import OutputGroup

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = save(state, metadata={"arch": name})
    test_acc, test_correct = accuracy(model, xte, yte)
    ev = load_builtin_dataset("fashion-mnist", "eval")
    xe, ye = ev.tensors(FASHION_PREPROCESSING)
    eval_acc, eval_correct = accuracy(model, xe, ye)
    n_params = count_parameters(model)
    fp32 = sum(v.numel() for k, v in state.items() if v.is_floating_point()) * 4
    card = {
        "name": name,
        "arch": name,
        "description": spec.description,
        "class_names": list(FASHION_MNIST_CLASSES),
        "preprocessing": FASHION_PREPROCESSING.to_dict(),
        "parameters": n_params,
        "fp32_bytes": fp32,
        "test_accuracy": test_acc,
        "test_correct": test_correct,
        "test_images": len(xte),
        "eval_accuracy": eval_acc,
        "eval_correct": eval_correct,
        "eval_images": len(xe),
        "target_accuracy": spec.target_accuracy,
        "training": {
            "command": f"python -m xaicomp_core.train {name} --epochs {epochs} --seed {seed} --threads {threads}",
            "seed": seed, "epochs": epochs, "batch_size": batch_size, "optimizer": "SGD nesterov 0.9, wd 5e-4",
            "schedule": f"one-cycle, max lr {spec.lr}", "augmentation": "2-px shifts, horizontal flips",
            "data": "Fashion-MNIST 60k train / 10k test (Debian dataset-fashion-mnist, MIT)",
            "seconds": round(seconds, 1), "threads": threads,
            "machine": f"{platform.machine()} {platform.processor() or ''} CPU".strip(),
            "torch": torch.__version__, "python": platform.python_version(),
            "history": history,
        },
    }
    group = OutputGroup()  # the weights and their model card land together, atomically, or neither
    group.add(out_dir / f"{name}.safetensors", weights, "weights")
    group.add(out_dir / f"{name}.json", json.dumps(card, indent=2) + "\n", "model card")
    group.commit()
    log(f"[{name}] done: test {test_acc:.4f}, eval {eval_acc:.4f}, {seconds:.0f}s")
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry."""
    ap = argparse.ArgumentParser(prog="python -m xaicomp_core.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", choices=list(BUILTIN_MODELS))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source", default=None, help="folder with the Fashion-MNIST idx files")
    ap.add_argument("--out", default=str(MODELS_DIR))
    args = ap.parse_args(argv)
    for name in args.names:
        train(name, args.epochs, args.seed, args.threads, args.source, pathlib.Path(args.out),
              log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
