"""The exported decision forward alone: ms per call and aten ops per call of the TorchScript policy, on 1 thread.

    .venv/bin/python benchmarks/bench_forward.py                # the working tree's export
    .venv/bin/python benchmarks/bench_forward.py HEAD           # HEAD's export of the same weights against it
    .venv/bin/python benchmarks/bench_forward.py HEAD --sizes 1,128 --calls 2
    .venv/bin/python benchmarks/bench_forward.py HEAD --config '{"context_length": 6, "d_model": 32}'
    .venv/bin/python benchmarks/bench_forward.py --gap 2       # each timed call after 2 ms idle, then once more

Nothing is trained: a model (ModelConfig(feature_dim=8, num_actions=4), other fields from --config) gets random
parameters (normal, std 0.5) and a random normalisation. Each revision exports these weights with its own export code
(`write_policy`, or `save_scripted(PolicyModule(model))` in a revision without it), in a subprocess run in a
git worktree of it; both artifacts are then loaded here and called in turns, one call each, on full contexts
(every step real), since a shared machine's speed can drift up to 2x within minutes: medians taken in one
interleaved run compare, figures from separate runs do not. Page faults per call are shown as well: at 1024
users the forward's fresh [B*L, h] buffers can each come back from the OS zero-filled (glibc gives large freed
blocks back to it), which costs as much as the arithmetic.

`--gap MS` idles MS ms (a sleep) before each timed call and then calls the same module once more at once: a
service that is not saturated calls its forward after such gaps, with other work (the event loop, Redis, other
tenants of the host) run on the CPU in between; the second call shows what the same forward costs warm.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from compare_revisions import checkout
from torch.profiler import ProfilerActivity, profile

from offline.model import ModelConfig, SacoTransformer

REPO = Path(__file__).resolve().parents[1]

CALLS = {1: 3000, 16: 2000, 128: 800, 1024: 120}  # timed calls per module and size

EXPORT = """
import sys, torch
from model_store import save_scripted
from offline.model import ModelConfig, PolicyModule, SacoTransformer
saved = torch.load(sys.argv[1])
model = SacoTransformer(ModelConfig(**saved["config"]))
model.load_state_dict(saved["state"])
try:
    from offline.export import write_policy
except ImportError:
    save_scripted(PolicyModule(model.eval()).eval(), sys.argv[2])
else:
    write_policy(model, sys.argv[2])
"""


def random_model(config: dict[str, Any], seed: int = 0) -> SacoTransformer:
    if "history_decays" in config:
        config = {**config, "history_decays": tuple(config["history_decays"])}
    torch.manual_seed(seed)
    model = SacoTransformer(ModelConfig(**{"feature_dim": 8, "num_actions": 4, **config}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
        d = model.cfg.feature_dim
        model.set_normalisation(torch.randn(d), torch.rand(d) + 0.5, 3.0, 2.0)
    return model.eval()


def export(repo: Path, weights: Path, out: Path) -> torch.jit.ScriptModule:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-c", EXPORT, str(weights), str(out)], cwd=repo, env=env, check=True)
    module = torch.jit.load(str(out))
    module.eval()
    return module


def inputs(users: int, cfg: ModelConfig, padded: bool, seed: int) -> list[torch.Tensor]:
    """Random model inputs; `padded`: right-aligned contexts of every length from 1 to L, else full ones."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.context_length
    mask = torch.ones(users, L, dtype=torch.bool)
    if padded:
        mask = torch.arange(L) >= L - (torch.arange(users) % L + 1).view(-1, 1)
    return [
        torch.randn(users, L, cfg.feature_dim, generator=g) * 2,
        torch.randint(0, cfg.num_actions, (users, L), generator=g),
        torch.rand(users, L, generator=g).flip(1).cumsum(1).flip(1) * 5,
        torch.rand(users, L, generator=g).flip(1).cumsum(1).flip(1) * 2,
        torch.arange(L).repeat(users, 1) + torch.randint(0, 60, (users, 1), generator=g),
        torch.rand(users, generator=g) * 2,
        mask,
    ]


def aten_ops_per_call(module: torch.jit.ScriptModule, x: list[torch.Tensor], calls: int = 10) -> float:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            module(*x)
    return sum(event.name.startswith("aten::") for event in prof.events()) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", nargs="?", help="a revision to compare against (a commit, tag or branch)")
    parser.add_argument("--sizes", default="1,16,128,1024", help="users per call, comma-separated")
    parser.add_argument("--calls", type=float, default=1.0, help="multiplies the timed calls per size")
    parser.add_argument("--config", default="{}", help="JSON of ModelConfig fields (default: the defaults)")
    parser.add_argument("--gap", type=float, default=0.0, help="ms idle before each timed call (then one warm call)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = random_model(json.loads(args.config))
    names = ["working tree"] if args.base is None else [args.base, "working tree"]

    with tempfile.TemporaryDirectory(prefix="saco-forward-") as tmp:
        root = Path(tmp)
        weights = root / "weights.pt"
        torch.save({"config": model.cfg.to_dict(), "state": model.state_dict()}, weights)
        modules = []
        for i, revision in enumerate([args.base, None] if args.base is not None else [None]):
            with checkout(revision, root) as repo:
                modules.append(export(repo, weights, root / f"policy-{i}.pt"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread; {model.cfg}")
    with torch.inference_mode():
        # float32 rounding differs between any two orders of the same arithmetic: the float64 training
        # forward is the yardstick
        x = inputs(256, model.cfg, padded=True, seed=0)
        exact = copy.deepcopy(model).double().decide(*(t.double() if t.is_floating_point() else t for t in x))
        scores = [module(*x) for module in modules]
        errors = [f"{n} {float((s.double() - exact).abs().max()):.1e}" for n, s in zip(names, scores, strict=True)]
        line = f"256 padded contexts, max |score| {float(exact.abs().max()):.1f}"
        line += f"; max |scores - float64 forward|: {', '.join(errors)}"
        if len(modules) == 2:
            line += f"; max |{names[1]} - {names[0]}| {float((scores[1] - scores[0]).abs().max()):.1e}"
        print(line)

        gap = args.gap / 1e3
        warm_column = "  warm ms" if gap else ""
        header = f"{'users':>5}  " + "  ".join(f"{name[:14]:>14} ms{warm_column}  aten ops  faults" for name in names)
        print(header + ("  ratio" if len(modules) == 2 else ""))
        for users in [int(s) for s in args.sizes.split(",")]:
            x = inputs(users, model.cfg, padded=False, seed=users)
            for module in modules:
                for _ in range(20):
                    module(*x)
            times: dict[int, list[float]] = collections.defaultdict(list)
            warm: dict[int, list[float]] = collections.defaultdict(list)  # the call right after a timed one
            faults: dict[int, int] = collections.defaultdict(int)
            calls = max(10, int(CALLS.get(users, 100) * args.calls))
            if gap:
                calls = min(calls, max(10, int(400 * args.calls)))  # each call waits `gap`
            for _ in range(calls):
                for i, module in enumerate(modules):
                    if gap:
                        time.sleep(gap)
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    started = time.perf_counter()
                    module(*x)
                    times[i].append(time.perf_counter() - started)
                    faults[i] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                    if gap:
                        started = time.perf_counter()
                        module(*x)
                        warm[i].append(time.perf_counter() - started)
            ms = [statistics.median(times[i]) * 1e3 for i in range(len(modules))]
            warm_ms = [f"  {statistics.median(warm[i]) * 1e3:>7.3f}" if gap else "" for i in range(len(modules))]
            ops = [aten_ops_per_call(module, x) for module in modules]
            row = f"{users:>5}  " + "  ".join(
                f"{ms[i]:>17.3f}{warm_ms[i]}  {ops[i]:>8.0f}  {faults[i] / calls:>6.0f}" for i in range(len(modules))
            )
            print(row + (f"  {ms[1] / ms[0]:.2f}" if len(modules) == 2 else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
