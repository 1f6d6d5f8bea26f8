"""bench/tracer.py (the real sidecar's stages in a process of its own), with the late-attach layouts set first.

Usage: late_tracer.py --layouts FILE.json [tracer.py options...]
FILE.json: [{"kind": "CUfunction", "name_at": [8], "checks": [[offset, value, size], ...]}, ...] replaces
otel_cuda.late_names.DRIVER_LAYOUTS for this process (bench/gpu/late_attach.py passes what it measured); an empty
list or a missing file keeps the built-in table; `--layouts off`: no late names at all.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

from otel_cuda import late_names  # noqa: E402


def load_layouts(path: str) -> tuple:
    with open(path) as f:
        spec = json.load(f)
    return tuple(late_names.Layout(d["kind"], tuple(d["name_at"]),
                                   tuple(late_names.Check(*c) for c in d.get("checks", ())), d.get("measured", ""))
                 for d in spec)


def main() -> int:
    argv = sys.argv[1:]
    if "--layouts" in argv:
        i = argv.index("--layouts")
        path = argv[i + 1]
        del argv[i:i + 2]
        if path == "off":  # names only from the name-giving calls (the attached-before path alone)
            late_names.DRIVER_LAYOUTS = ()
        elif os.path.exists(path):
            layouts = load_layouts(path)
            if layouts:
                late_names.DRIVER_LAYOUTS = layouts
    print(json.dumps({"layouts": [repr(lay) for lay in late_names.DRIVER_LAYOUTS]}), file=sys.stderr, flush=True)
    import tracer  # bench/tracer.py

    sys.argv = [os.path.join(os.path.dirname(HERE), "tracer.py"), *argv]
    return tracer.main()


if __name__ == "__main__":
    sys.exit(main())
