"""Take the planner's base weights to a machine that can only receive a few tens of MiB at a time, in parts.

Adapting on a GPU machine that reaches no package index and no model hub means sending it the base model. The
packaged SmolLM2-135M-Instruct GGUF (94 MiB, the smallest exact form of those weights: the planner's fp32
weights are its dequantisation) can be larger than one transfer may be. `pack` cuts it into parts of at most
`--part-mib` MiB, one folder each, with a manifest (size and SHA-256 of the whole), and puts the wheel of the
`gguf` package beside them (the native reader needs it); `join` puts the parts back together on the other side
and checks them against the manifest. Then `python -m planners.adapt --base <joined>.gguf --device cuda ...`
adapts there: the reader, the tokenizer and the torch teacher need only torch, transformers, safetensors, numpy,
tqdm and gguf.

    python -m planners.adapt.carry pack --out .carry              # here: .carry/p0, .carry/p1, ... + .carry/whl
    python -m planners.adapt.carry join --out /tmp/base.gguf /tmp/stash    # there, once every part is in /tmp/stash
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

MANIFEST = "manifest.json"


def pack(src: str | Path, out: str | Path, *, part_mib: float = 40.0) -> list[Path]:
    """Cut `src` into parts of at most `part_mib` MiB: `out/p<k>/<name>.part<k>`, with `manifest.json` (name,
    size, SHA-256, number of parts) in every part's folder, so any one of them tells what the whole is."""
    from planners.export_gguf import file_digest

    src, out = Path(src), Path(out)
    if part_mib <= 0:
        raise ValueError(f"part_mib must be > 0, got {part_mib}")
    size = src.stat().st_size
    step = int(part_mib * (1 << 20))
    n = max(1, -(-size // step))
    manifest = {"name": src.name, "size": size, "sha256": file_digest(src), "parts": n}
    folders = []
    with src.open("rb") as f:
        for k in range(n):
            d = out / f"p{k}"
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            (d / f"{src.name}.part{k}").write_bytes(f.read(step))
            (d / MANIFEST).write_text(json.dumps(manifest, indent=2))
            folders.append(d)
    return folders


def join(stash: str | Path, dst: str | Path) -> Path:
    """Concatenate the parts found in `stash` (as `pack` named them) into `dst`; check size and SHA-256."""
    from planners.export_gguf import file_digest

    stash, dst = Path(stash), Path(dst)
    m = json.loads((stash / MANIFEST).read_text())
    parts = [stash / f"{m['name']}.part{k}" for k in range(m["parts"])]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{stash}: parts missing: {', '.join(missing)} (of {m['parts']})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    if dst.stat().st_size != m["size"] or file_digest(dst) != m["sha256"]:
        raise ValueError(f"{dst}: the joined parts do not match the manifest (size {m['size']}, sha256 {m['sha256']})")
    return dst


def _wheel(out: Path) -> Path:
    """The installed `gguf` package's wheel, from the package index, into `out`."""
    from importlib.metadata import version

    out.mkdir(parents=True, exist_ok=True)
    spec = f"gguf=={version('gguf')}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(out), spec]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return next(out.glob("gguf-*.whl"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planners.adapt.carry", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="cut the base GGUF into parts, one folder each (+ the gguf wheel)")
    pk.add_argument("--gguf", default=None, help="default: the packaged SmolLM2-135M-Instruct GGUF")
    pk.add_argument("--out", default=".carry")
    pk.add_argument(
        "--part-mib", type=float, default=40.0, help="MiB per part: what one transfer takes, less the repository"
    )
    pk.add_argument("--no-wheel", action="store_true", help="do not fetch the gguf wheel")
    jn = sub.add_parser("join", help="put the parts in STASH back together and check them")
    jn.add_argument("stash")
    jn.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "join":
        print(join(a.stash, a.out))
        return 0
    if a.gguf is None:
        from planners.assets import smollm2_gguf_path

        a.gguf = smollm2_gguf_path()
    out = Path(a.out)
    for d in pack(a.gguf, out, part_mib=a.part_mib):
        print(f"{d}  {sum(f.stat().st_size for f in d.iterdir()) / (1 << 20):.1f} MiB")
    if not a.no_wheel:
        print(_wheel(out / "whl"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
