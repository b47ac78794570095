"""W_2 benchmark (not a test): verifier's distributional attacks against the paper's released
WDA/WDA++ code and Bai et al.'s W-PGD, on the same torch modules, every distribution re-checked.

    .venv/bin/python tools/bench_w2.py run --samples 200 --wda-ref DIR --bai-ref DIR [--models cnn,...] \
        [--norms inf,2] [--deltas 1/255,2/255,4/255,8/255,16/255] > w2.jsonl
    .venv/bin/python tools/bench_w2.py table w2.jsonl

`run`: per shipped model and ground norm r (l_inf, l_2), W_2 (p = 2), CE loss, box [0, 1], the
first `--samples` test samples, one torch thread:
- verifier: `attack(..., ["wda", "wdapp", "wpgd", "wda-curve"], deltas, p=2)` (seed 0);
- the paper's code (github.com/OLab-Repo/WDA, its `wda.py` in folder `--wda-ref`, imported at
  bench time only; MIT licence; it is no part of verifier): `run_wda_pp` with `wasserstein_p=2`
  (its closest flips and fractional knapsack; Q = (1 - alpha_i)/N at x_i + alpha_i/N at the
  flip) at the settings of its `run_wda_attack.py` (20 steps of 0.02, top-9, 10 bisections,
  `logit_raw` selection) and a longer walk (100 steps of 0.01, reaching 1.0 in the ground norm,
  farther than any atom may move here); `run_wda` (point-wise at radius delta, which is within
  W_2 delta) at the same script's settings (20 steps of 0.02, probe 10 steps, top-9);
- Bai et al. (github.com/JanObloj/W-DRO-Adversarial-Methods, its `src/` in folder `--bai-ref`;
  MIT licence): `attacker.wpgd(q=2, s, delta, CE())` (50 steps of 1.875 delta / 50, batch
  normalisation, per-image clamp for l_inf), run on all samples as one batch (its W_2 ball
  couples the whole sample); it keeps the lowest-accuracy iterate and reports the highest mean
  loss along its trajectory, whose iterate is captured here by wrapping its `eval`.
All peers run on `verifier.jacobian.prepared_module` (through `_Images`: image-shaped (N,1,8,8)
inputs, which Bai's per-image norms need). Every peer distribution goes through verifier's
`measure`: its W_2 cost recomputed in float64 from the atoms, its risk and accuracy re-evaluated
in onnxruntime. A peer over budget is projected (its moved mass scaled by (delta / cost)^2 back
onto the samples, the result marked `projected` with the cost it had).
Times are CPU (process) seconds with one torch thread: the shared machine's wall times are noise.
Prints one JSON line per (model, norm, delta) on stdout; `table` turns them into the markdown
tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

from bench_attacks import SHIPPED, _Images, _load  # noqa: E402

VERIFIER = ("wda", "wdapp", "wpgd", "wda-curve")
NORM_NAMES = {"inf": "Linf", "2": "L2"}


def _fraction(text: str) -> float:
    top, _, bottom = text.partition("/")
    return float(top) / float(bottom or 1)


def _measured(name, delta, atoms, weights, source, seconds, target, replayer, clean, extra=None) -> dict:
    """A peer's distribution through verifier's `measure` (float64 cost, onnxruntime risk); over
    budget: the moved mass scaled back onto the samples until the cost is delta."""
    from verifier.attacks.replay import measure
    from verifier.attacks.result import Distribution, atom_distances, cost_of
    atoms = atoms.reshape(len(atoms), *target.x.shape[1:]).to(target.x.dtype)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    keep = weights > 0
    atoms, weights, source = atoms[keep], weights[keep], source[keep]
    distance = atom_distances(atoms, source, target.x, target.norm)
    cost = cost_of(weights, distance, target.p)
    row = dict(extra or {})
    if cost > delta:
        moved = distance > 0
        scale = (delta / cost) ** 2 * (1 - 1e-9)
        back = weights * moved * (1 - scale)
        weights = weights - back
        returned = torch.zeros(target.count, dtype=torch.float64).index_add_(0, source, back)
        atoms = torch.cat([atoms, target.x.cpu()[returned > 0]])
        weights = torch.cat([weights, returned[returned > 0]])
        source = torch.cat([source, torch.arange(target.count)[returned > 0]])
        row["projected"] = cost
    dist = Distribution(atoms, weights, source, 0, (), seconds)
    result = measure(name, delta, dist, target, replayer, clean)
    row.update(risk=result.risk, accuracy=result.robust_accuracy, cost=result.transport_cost,
               seconds=seconds, flags=list(result.flags))
    return row


def _paper_wdapp(wda, images, x, y, delta, norm, steps, step, target, replayer, clean) -> dict:
    start = time.process_time()
    x_adv, _, aux = wda.run_wda_pp(images, x, y, eps=delta, norm=NORM_NAMES[norm], wasserstein_p=2, steps=steps,
                                   bs=64, topk=9, srchiter=10, step_size=step, device="cpu", verbose=False,
                                   return_history=False, select_metric="logit_raw")
    seconds = time.process_time() - start
    n = len(x)
    alpha = aux["alpha"].to(torch.float64)
    source = torch.arange(n)
    return _measured("paper-wdapp", delta, torch.cat([x, x_adv]), torch.cat([(1 - alpha) / n, alpha / n]),
                     torch.cat([source, source]), seconds, target, replayer, clean,
                     {"reported_spent": aux["spent"], "flips": int(torch.isfinite(aux["distances"]).sum())})


def _paper_wda(wda, images, x, y, delta, norm, target, replayer, clean) -> dict:
    start = time.process_time()
    x_adv, _, _ = wda.run_wda(images, x, y, eps=delta, norm=NORM_NAMES[norm], steps=20, bs=64, topk=9,
                              step_size=0.02, probe_steps=10, loss_metric="dlr", select_metric="logit_raw",
                              device="cpu", verbose=False, return_history=False)
    seconds = time.process_time() - start
    n = len(x)
    return _measured("paper-wda", delta, x_adv, torch.full((n,), 1.0 / n), torch.arange(n), seconds, target,
                     replayer, clean)


def _bai_wpgd(bai, images, x, y, delta, norm, target, replayer, clean) -> dict:
    attacker_module, loss_fns = bai
    captured = {"loss": -math.inf, "x": None}
    original = attacker_module.eval

    def watched(network, X=None, y=None, loss_fn=None, cond=False):
        out = original(network, X=X, y=y, loss_fn=loss_fn, cond=cond)
        if out["loss"] > captured["loss"]:
            captured.update(loss=out["loss"], x=X.clone())
        return out

    attacker = attacker_module.wpgd(2, 1 if norm == "inf" else 2, delta, loss_fns.CE(), X=x.clone(), y=y.clone())
    attacker_module.eval = watched
    try:
        start = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every step's accuracy
            out = attacker.attack(images, verbose=True)
        seconds = time.process_time() - start
    finally:
        attacker_module.eval = original
    n = len(x)
    weights, source = torch.full((n,), 1.0 / n), torch.arange(n)
    risk = _measured("bai-wpgd", delta, captured["x"], weights, source, seconds, target, replayer, clean,
                     {"reported_loss": out["loss_max"], "reported_accuracy": out["acc_min"]})
    accuracy = _measured("bai-wpgd", delta, out["X_adv"], weights, source, seconds, target, replayer, clean)
    risk["accuracy"] = accuracy["accuracy"]  # Bai's accuracy iterate (the lowest accuracy along the run)
    risk["accuracy_cost"] = accuracy["cost"]
    return risk


def _import_peers(wda_ref: str, bai_ref: str):
    sys.path.insert(0, wda_ref)
    import wda  # the paper's released wda.py
    sys.modules.setdefault("data", types.SimpleNamespace(BATCH_SIZE=32))  # Bai's data.py needs torchvision
    sys.path.insert(0, str(Path(bai_ref) / "src") if (Path(bai_ref) / "src").is_dir() else bai_ref)
    import attacker
    import loss_fns
    return wda, (attacker, loss_fns)


def run(args) -> None:
    from verifier.attacks import _target, attack
    from verifier.attacks.replay import Replayer, clean_numbers
    from verifier.deadline import NEVER
    wda, bai = _import_peers(args.wda_ref, args.bai_ref)
    deltas = [_fraction(d) for d in args.deltas.split(",")]
    device = torch.device("cpu")
    for name in args.models.split(","):
        loaded, model, x, y = _load(name, args.samples)
        replayer = Replayer(loaded, model, device)
        for norm in args.norms.split(","):
            target = _target(model, x, y, 2.0, norm, "ce", (0.0, 1.0), device, NEVER)
            clean = clean_numbers(target, replayer)
            results, cpu = [], {}
            for method in VERIFIER:  # one call per method: its CPU time over every delta
                start = time.process_time()
                results += attack(model, loaded, x, y, [method], deltas, p=2.0, norm=norm, loss="ce",
                                  box=(0.0, 1.0)).results
                cpu[method] = time.process_time() - start
            images = _Images(target.module, x.shape[1:]).eval()
            xi, yi = torch.from_numpy(x).reshape(len(x), 1, 8, 8), torch.from_numpy(y).long()
            for delta in deltas:
                ours = {r.method: {"risk": r.risk, "accuracy": r.robust_accuracy, "cost": r.transport_cost,
                                   "seconds": r.seconds, "flags": list(r.flags)}
                        for r in results if r.delta == delta}
                peers = {
                    "paper-wdapp": _paper_wdapp(wda, images, xi, yi, delta, norm, 20, 0.02, target, replayer, clean),
                    "paper-wdapp-long": _paper_wdapp(wda, images, xi, yi, delta, norm, 100, 0.01, target, replayer,
                                                     clean),
                    "paper-wda": _paper_wda(wda, images, xi, yi, delta, norm, target, replayer, clean),
                    "bai-wpgd": _bai_wpgd(bai, images, xi, yi, delta, norm, target, replayer, clean),
                }
                print(json.dumps({"model": name, "norm": norm, "delta": delta, "samples": len(x),
                                  "clean_risk": clean[0], "clean_accuracy": clean[1], "verifier": ours,
                                  "verifier_cpu_seconds": cpu, "peers": peers}), flush=True)


def table(args) -> None:
    rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    print("| model | r | δ | clean | verifier best risk (attack) | paper WDA++ / long walk | paper WDA | Bai W-PGD "
          "| best − best peer | lowest acc. % verifier / peers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    misses, projected = [], set()
    for r in rows:
        ours, peers = r["verifier"], r["peers"]
        best = max(ours, key=lambda m: ours[m]["risk"])
        peer = max(peers, key=lambda m: peers[m]["risk"])
        gap = ours[best]["risk"] - peers[peer]["risk"]
        if gap < 0:
            misses.append((r["model"], r["norm"], r["delta"], peer, gap))
        projected |= {m for m in peers if "projected" in peers[m]}
        acc_ours = min(v["accuracy"] for v in ours.values()) * 100
        acc_peer = min(v["accuracy"] for v in peers.values()) * 100
        print(f"| {r['model']} | {'∞' if r['norm'] == 'inf' else r['norm']} | {round(r['delta'] * 255)}/255 "
              f"| {r['clean_risk']:.4f} | **{ours[best]['risk']:.4f}** ({best}) "
              f"| {peers['paper-wdapp']['risk']:.4f} / {peers['paper-wdapp-long']['risk']:.4f} "
              f"| {peers['paper-wda']['risk']:.4f} | {peers['bai-wpgd']['risk']:.4f} | {gap:+.2e} "
              f"| {acc_ours:.1f} / {acc_peer:.1f} |")
    print(f"\ncells where a peer's risk is higher: {len(misses)} of {len(rows)} {misses}")
    wdapp = [(r["verifier"]["wdapp"]["accuracy"] - min(r["peers"]["paper-wdapp"]["accuracy"],
                                                      r["peers"]["paper-wdapp-long"]["accuracy"])) * 100 for r in rows]
    print(f"verifier wdapp accuracy - paper WDA++'s (points): {min(wdapp):+.2f} to {max(wdapp):+.2f}, "
          f"above it in {sum(w > 0 for w in wdapp)} of {len(rows)} cells")
    excess = [(p["projected"] - r["delta"]) / r["delta"] for r in rows for p in r["peers"].values() if "projected" in p]
    if excess:
        print(f"projected peers: {sorted(projected)}, {len(excess)} distributions, relative excess "
              f"{min(excess):.1e} to {max(excess):.1e}")
    print("\nCPU seconds over all deltas:\n")
    print("| model | r | " + " | ".join(VERIFIER) + " | paper WDA++ / long | paper WDA | Bai W-PGD |")
    print("|---|---|" + "---|" * (len(VERIFIER) + 3))
    for key in dict.fromkeys((r["model"], r["norm"]) for r in rows):
        group = [r for r in rows if (r["model"], r["norm"]) == key]
        cpu = group[0]["verifier_cpu_seconds"]
        peer = {m: sum(r["peers"][m]["seconds"] for r in group) for m in group[0]["peers"]}
        print(f"| {key[0]} | {'∞' if key[1] == 'inf' else key[1]} | " + " | ".join(f"{cpu[m]:.1f}" for m in VERIFIER)
              + f" | {peer['paper-wdapp']:.1f} / {peer['paper-wdapp-long']:.1f} | {peer['paper-wda']:.1f} "
              f"| {peer['bai-wpgd']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("run", "table"))
    parser.add_argument("jsonl", nargs="?", help="for `table`: the output of `run`")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--models", default=",".join(SHIPPED))
    parser.add_argument("--norms", default="inf,2")
    parser.add_argument("--deltas", default="1/255,2/255,4/255,8/255,16/255")
    parser.add_argument("--wda-ref", default="/tmp/wda_ref", help="folder holding the paper's wda.py")
    parser.add_argument("--bai-ref", default="/tmp/bai_ref", help="folder holding Bai et al.'s src/")
    args = parser.parse_args()
    if args.kind == "run":
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        np.seterr(all="ignore")
        run(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
