#!/usr/bin/env python3
# Draws <run>/training_curves.png from <run>/training_metrics.csv: loss and eval loss, learning
# rate, and throughput per step. `zinf train` runs it at the end of a run with /usr/bin/python3
# (Debian's python3-matplotlib) unless ZINF_PYTHON names another interpreter.
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    run = sys.argv[1] if len(sys.argv) > 1 else "."
    rows = list(csv.DictReader(open(os.path.join(run, "training_metrics.csv"))))
    if not rows:
        sys.exit(f"{run}/training_metrics.csv has no steps")
    step = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    ev = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]]
    lr = [float(r["lr"]) for r in rows]
    tps = [float(r["tokens_per_s"]) for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(step, loss, label="train loss", lw=1)
    if ev:
        ax[0].plot([s for s, _ in ev], [v for _, v in ev], "o-", label="eval loss")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    ax[1].plot(step, lr)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("learning rate")
    ax[1].grid(alpha=0.3)
    ax[2].plot(step, tps)
    ax[2].set_xlabel("step")
    ax[2].set_ylabel("tokens/s")
    ax[2].grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run)))
    fig.tight_layout()
    out = os.path.join(run, "training_curves.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
