"""`agdlm bench manifest`: what checkpoint manifests (agdlm.manifest) cost at the memory
benchmark's model (8 layers x 1024, block 64, GPT-2 vocabulary: 152M parameters). A real
one-process checkpoint of it is written by the trainer's backend after one step (model.pt, and
optimizer.pt: AdamW's two moments, or AGD's few scalars), then timed:

  save      the backend writing its files (for scale)
  write     checksumming every file and writing manifest.json (what a save adds)
  verify    checking every file against the manifest (what a resume, sample or export adds),
            with the files in the page cache (just written, as on the node that wrote them) and
            with their pages dropped first (posix_fadvise DONTNEED: read back from this disk)

Seconds and seconds per GB (10^9 bytes), best of --repeat. One process checks all the bytes;
N ranks share them (about 1/N each). Figures, never asserts; the 1-minute load average is
printed with them, since a busy machine slows every figure.

    agdlm bench manifest [--optim adamw] [--n-layer 8] [--n-embd 1024] [--repeat 3] [--dir DIR]"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def drop_pages(folder: Path) -> None:
    """Flush and drop the page cache of every file under `folder` (only our own files)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def best_seconds(action, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def write_checkpoint(folder: Path, overrides: list[str]) -> float:
    """The trainer's single backend, one step on random tokens, then its save; returns the save's seconds."""
    import torch

    from agdlm.config import load_config
    from agdlm.parallel.env import DistEnv
    from agdlm.train import build_model_and_backend

    cfg = load_config(None, overrides)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    backend = build_model_and_backend(cfg, env, fresh=True)
    data = torch.randint(0, cfg.model.vocab_size, (1, cfg.model.block_size + 1))
    backend.forward_backward(data[:, :-1], data[:, 1:], 1, True)
    backend.optimizer_step(0.0)
    start = time.perf_counter()
    backend.save(folder)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agdlm bench manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--optim", default="adamw", choices=("agd", "adamw"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from agdlm.manifest import checkpoint_files, manifest_problem, seal

    overrides = [f"model.n_layer={args.n_layer}", f"model.n_head={max(1, args.n_embd // 64)}",
                 f"model.n_embd={args.n_embd}", f"model.block_size={args.block_size}", "model.bias=true",
                 "train.device=cpu", "train.precision=fp32", f"optim.name={args.optim}", "train.micro_batch_size=1",
                 "train.global_batch_size=1"]
    root = Path(tempfile.mkdtemp(prefix="agdlm-bench-manifest-", dir=args.dir))
    try:
        folder = root / "step_1"
        folder.mkdir()
        save_s = write_checkpoint(folder, overrides)
        sizes = checkpoint_files(folder)
        gb = sum(sizes.values()) / 1e9
        write_s = best_seconds(lambda: seal(folder), args.repeat)
        warm_s = best_seconds(lambda: manifest_problem(folder), args.repeat)
        cold_s = best_seconds(lambda: manifest_problem(folder), args.repeat, before=lambda: drop_pages(folder))
        assert manifest_problem(folder) is None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"GPT {args.n_layer}x{args.n_embd}, {args.optim}: {len(sizes)} files, {gb:.3f} GB "
          f"({', '.join(f'{name} {size / 1e9:.3f}' for name, size in sizes.items())}); one process; "
          f"1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'':<22} {'seconds':>8} {'s per GB':>9}")
    for name, seconds in (("save (backend)", save_s), ("manifest write", write_s), ("verify, page cache", warm_s),
                          ("verify, from disk", cold_s)):
        print(f"{name:<22} {seconds:>8.3f} {seconds / gb:>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
