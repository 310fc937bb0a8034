"""Profile the routers of a running server for a few seconds of whatever load it has (start the load first, e.g.
with `serve_load.py`): each router's step cadence beside its steps' own time, and its event loop's Python time by
function (`RouterActor.profile`). The served Mixtral's ITL at batch 128 was 54 ms on one H200 where `gpu_scale`'s
step is 40 ms (bench/NOTES.md): this says whether the gap is the router's host work between steps. The cadence to
quote is the unprofiled one (the first `--seconds`): cProfile slows every Python call of the loop several times.

    PYTHONPATH=. python bench/router_profile.py --seconds 10 [--out bench/results/router_profile-....json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ray


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="auto")
    p.add_argument("--seconds", type=float, default=10.0, help="unprofiled, then as long again under cProfile")
    p.add_argument("--out")
    args = p.parse_args()
    ray.init(address=args.address, namespace="router-profile", logging_level="ERROR")
    actors = ray.util.list_named_actors(all_namespaces=True)
    handles = {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"]) for a in actors if "-router-" in a["name"]}
    if not handles:
        raise SystemExit("no router actor in this Ray cluster: is a server running?")
    workers = {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"]) for a in actors if "-stage" in a["name"]}
    before = {name: ray.get(w.decode_paths.remote()) for name, w in workers.items()}
    found = dict(zip(handles, ray.get([h.profile.remote(args.seconds) for h in handles.values()]), strict=True))
    for name, row in found.items():
        skip = ("profile", "by_kind", "unprofiled")
        print(f"== {name}: " + json.dumps({k: v for k, v in row.items() if k not in skip}))
        quiet = row.get("unprofiled", {})
        print("   unprofiled: " + json.dumps({k: v for k, v in quiet.items() if k != "by_kind"}))
        for when, figures in (("profiled", row), ("unprofiled", quiet)):
            for kind, by_kind in figures.get("by_kind", {}).items():
                print(f"   {kind} steps ({when}): " + json.dumps(by_kind))
        print(row["profile"][:6000])
    # graphs captured (an eager step, then a capture) against replayed, while the profile listened
    for name, w in workers.items():
        after = ray.get(w.decode_paths.remote())
        for stage, now in after.items():
            then = before[name].get(stage, {})
            row = {k: now.get(k, 0) - then.get(k, 0) for k in ("graph_captures", "graph_replays")}
            found.setdefault("graphs", {})[stage] = row
            print(f"== {stage} graphs: {json.dumps(row)}")
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
