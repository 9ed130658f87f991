"""`agdlm export RUN_DIR OUT.pt [--checkpoint step_N]`: one consolidated model file from any
backend's checkpoint, on one process, without a process group.

OUT.pt is {"model": state dict (fp32, CPU), "model_config": the model section as a dict,
"step": the checkpoint's step, "source": the checkpoint folder}; it loads with
`torch.load(OUT.pt, weights_only=True)` into `GPT(GPTConfig(**model_config))`.

Checkpoint layouts read here (what each backend writes in checkpoints/step_N/):
  single, ddp   model.pt                  the whole state dict
  fsdp2         dcp/                      torch.distributed.checkpoint shards
  deepspeed     deepspeed/                the engine's checkpoint (ZeRO 1/2/3), read with
                                          DeepSpeed's zero_to_fp32 (fp32 master weights)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from agdlm.checkpoint import atomic_torch_save, checkpoints_dir, latest_checkpoint, read_json
from agdlm.config import build_config, read_yaml_mapping
from agdlm.model import GPT, GPTConfig
from agdlm.parallel import CHECKPOINT_LAYOUT


def run_config(run_dir: Path):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an agdlm run directory?")
    return build_config(read_yaml_mapping(path))


def consolidated_state_dict(ckpt: Path, model_cfg) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from one checkpoint folder of any backend."""
    ckpt = Path(ckpt)
    model = GPT(model_cfg)
    model_file, dcp_dir, ds_tag = (CHECKPOINT_LAYOUT[b] for b in ("single", "fsdp2", "deepspeed"))
    if (ckpt / model_file).is_file():
        state = torch.load(ckpt / model_file, map_location="cpu", weights_only=True)
    elif (ckpt / dcp_dir).is_dir():
        import torch.distributed.checkpoint as dcp

        state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        dcp.load({"model": state}, checkpoint_id=str(ckpt / dcp_dir), no_dist=True)
    elif (ckpt / ds_tag).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ds_tag)
    else:
        raise FileNotFoundError(f"{ckpt} holds no {model_file}, {dcp_dir}/ or {ds_tag}/ checkpoint")
    if model_cfg.tie_embeddings:  # one tensor under two names: fill whichever is missing
        for a, b in (("lm_head.weight", "transformer.wte.weight"), ("transformer.wte.weight", "lm_head.weight")):
            if a not in state and b in state:
                state[a] = state[b]
    model.load_state_dict(state)  # strict: every tensor present with its logical shape
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}


def export(run_dir: Path, out: Path, checkpoint: str | None = None) -> Path:
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    ckpt = checkpoints_dir(run_dir) / checkpoint if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None or not ckpt.is_dir():
        raise FileNotFoundError(f"{run_dir} has no checkpoint {checkpoint or '(checkpoints/latest is missing)'}")
    trainer = ckpt / "trainer.json"
    payload = {
        "model": consolidated_state_dict(ckpt, cfg.model),
        "model_config": dataclasses.asdict(cfg.model),
        "step": int(read_json(trainer)["step"]) if trainer.is_file() else -1,
        "source": str(ckpt),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, out)
    return out


def load_exported(path: Path, device: str = "cpu") -> GPT:
    payload = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agdlm export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint", default=None, help="a folder name under checkpoints/ (default: latest)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export(args.run_dir, args.out, args.checkpoint)
    except FileNotFoundError as e:
        print(f"agdlm export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
