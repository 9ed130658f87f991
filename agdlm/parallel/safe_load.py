"""Reading checkpoints without running code from them.

Run folders are shared, and every checkpoint format holds pickles: `torch.save` files,
the DCP `.metadata` file and DeepSpeed's `*_states.pt`. An unpickler that may import any
name runs whatever the file asks for, so every reader here allows only the types these
files need:

  model.pt, optimizer.pt, scaler.pt, rng_*.pt, exported files
      torch.load(weights_only=True): tensors, containers, numbers, strings
  dcp/.metadata
      a restricted unpickler: the torch.distributed.checkpoint metadata classes, torch.Size,
      dtypes, layouts, paths; every shard it names must lie inside the dcp/ folder
  dcp/__*.distcp
      tensors through DCP's own weights_only reader; non-tensor items (optimiser
      param_groups) with weights_only=True instead of DCP's default unpickler
  deepspeed/*_states.pt
      torch.load(weights_only=True) plus DeepSpeed's loss-scaler, ZeRO-stage and
      fragment-address classes

Anything else raises CheckpointReadError naming the file (and the refused type, if that is
why); nothing is unpickled past the refused name."""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from pathlib import Path

import torch

DCP_METADATA_FILE = ".metadata"


class CheckpointReadError(Exception):
    """A checkpoint file that cannot be read: missing, damaged, not a checkpoint, or holding
    a pickled type that a checkpoint never needs (`refused_type` is then set)."""

    def __init__(self, path: Path | str, reason: str, refused_type: str | None = None):
        self.path, self.reason, self.refused_type = Path(path), reason, refused_type
        super().__init__(f"{path}: {reason}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _refusal(path: Path, type_name: str) -> CheckpointReadError:
    return CheckpointReadError(
        path, f"holds a pickled {type_name}, which no checkpoint needs; refused to unpickle it", refused_type=type_name
    )


# ---- torch.save files ----------------------------------------------------------------------
# How torch's weights_only unpickler names a type it refused (wording differs by case).
_UNSUPPORTED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")


def load_torch_file(path: Path, map_location="cpu", allowed_types: tuple = ()):
    """torch.load(weights_only=True), with `allowed_types` added to what it accepts."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(path, "missing" if not path.exists() else "is not a file")
    try:
        with torch.serialization.safe_globals(list(allowed_types)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _UNSUPPORTED_GLOBAL.search(str(e))
        if refused:
            raise _refusal(path, refused.group(1)) from None
        if "Weights only load failed" in str(e):  # some other construct the safe unpickler rejects
            raise CheckpointReadError(path, "holds pickled code that a checkpoint never needs; refused to load it",
                                      refused_type="(unsupported pickle construct)") from None
        raise CheckpointReadError(path, f"not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        reason = f"not a readable PyTorch checkpoint, damaged or truncated ({_first_line(e)})"
        raise CheckpointReadError(path, reason) from None


# ---- torch.distributed.checkpoint (FSDP2) -----------------------------------------------------
def _dcp_allowed_types() -> dict[tuple[str, str], object]:
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md

    allowed = {
        (dcp_md.__name__, name): getattr(dcp_md, name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
    }  # fmt: skip
    allowed[(dcp_fs.__name__, "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls  # StorageMeta.checkpoint_id
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Resolves only the names a DCP `.metadata` file uses (and torch dtypes)."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path, self.allowed = path, _dcp_allowed_types()

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _refusal(self.path, f"{module}.{name}")


def read_dcp_metadata(dcp_dir: Path):
    """The DCP Metadata of `dcp_dir`, unpickled with only the metadata classes allowed, and
    checked: every shard file it names lies inside `dcp_dir`."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(dcp_dir) / DCP_METADATA_FILE
    if not path.is_file():
        raise CheckpointReadError(path, "missing: the dcp/ checkpoint is incomplete")
    try:
        with open(path, "rb") as f:
            metadata = _DCPMetadataUnpickler(f, path).load()
    except CheckpointReadError:
        raise
    except Exception as e:  # truncated or garbage: pickle raises many kinds
        raise CheckpointReadError(path, f"damaged DCP metadata ({_first_line(e)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointReadError(path, "is not DCP checkpoint metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointReadError(path, f"names a shard outside its folder ({name!r}); refused")
    return metadata


def safe_dcp_reader(dcp_dir: Path):
    """A FileSystemReader whose metadata comes from read_dcp_metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(dcp_dir)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(dcp_dir))


def safe_dcp_planner():
    """DCP's default load planner, except that non-tensor items are read weights_only."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def dcp_load(state: dict, dcp_dir: Path, no_dist: bool = False) -> None:
    """dcp.load into `state` through the safe reader and planner. The metadata is checked
    first, so a refused or damaged file is reported as itself, not inside DCP's wrapper."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    read_dcp_metadata(dcp_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is meant
            dcp.load(state, storage_reader=safe_dcp_reader(dcp_dir), planner=safe_dcp_planner(), no_dist=no_dist)
    except CheckpointReadError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures (a cut shard, a refused item)
        refused = _UNSUPPORTED_GLOBAL.search(str(e))
        if refused:
            raise _refusal(Path(dcp_dir), refused.group(1)) from None
        raise CheckpointReadError(dcp_dir, f"damaged DCP checkpoint ({_first_line(e)})") from None


# ---- DeepSpeed --------------------------------------------------------------------------------
def deepspeed_allowed_types() -> tuple:
    """The DeepSpeed classes its ZeRO optimiser states pickle (loss scaler, stage, slice map)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def load_deepspeed_file(path: Path, map_location="cpu"):
    return load_torch_file(path, map_location=map_location, allowed_types=deepspeed_allowed_types())


def safe_deepspeed_checkpoint_engine(config_params):
    """DeepSpeed's torch checkpoint engine with a load that unpickles only allowed types
    (its own load uses weights_only=False). Saving is unchanged."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        reads_safely = True

        def load(self, path: str, map_location=None):
            return load_deepspeed_file(Path(path), map_location=map_location)

    return SafeTorchCheckpointEngine(config_params)


def _zero_model_state(state: dict, path: Path):
    """zero_to_fp32's per-rank model record, built as its parse_model_states does."""
    from deepspeed.checkpoint.constants import (
        BUFFER_NAMES, DS_VERSION, FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, PARAM_SHAPES,
    )
    from deepspeed.utils.zero_to_fp32 import zero_model_state

    if not isinstance(state, dict) or BUFFER_NAMES not in state or "module" not in state:
        raise CheckpointReadError(path, "is not a DeepSpeed model-states file")
    try:
        buffers = {k: v.float() if v.is_floating_point() else v
                   for k, v in state["module"].items() if k in state[BUFFER_NAMES]}
        return zero_model_state(
            buffers=buffers, param_shapes=state[PARAM_SHAPES],
            shared_params=[[k, v] for k, v in state["shared_params"].items()], ds_version=state.get(DS_VERSION),
            frozen_param_shapes=state.get(FROZEN_PARAM_SHAPES),
            frozen_param_fragments=state.get(FROZEN_PARAM_FRAGMENTS),
        )
    except (KeyError, AttributeError, TypeError) as e:
        raise CheckpointReadError(path, f"damaged DeepSpeed model-states file ({_first_line(e)})") from None


def _zero_optimizer_states(ds_dir: Path) -> list[dict]:
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE
    from deepspeed.utils.zero_to_fp32 import get_optim_files

    states = []
    for file in map(Path, get_optim_files(str(ds_dir))):
        state = load_deepspeed_file(file)
        optim = state.get(OPTIMIZER_STATE_DICT) if isinstance(state, dict) else None
        if isinstance(optim, dict) and ZERO_STAGE not in optim and SINGLE_PARTITION_OF_FP32_GROUPS in optim:
            # bf16 with ZeRO 0/1 (DeepSpeed's BF16_Optimizer, bf16_zero_*_optim_states.pt): the same
            # flat fp32 partitions as ZeRO 1/2, without the stage key (zero_to_fp32 refuses these)
            optim = {**optim, ZERO_STAGE: 1}
        if not isinstance(optim, dict) or ZERO_STAGE not in optim:
            raise CheckpointReadError(file, "is not a DeepSpeed ZeRO optimiser-states file")
        states.append(optim)
    return states


def deepspeed_fp32_state_dict(ds_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO 1/2/3 checkpoint folder, consolidated as DeepSpeed's
    zero_to_fp32 does, but from files read by load_deepspeed_file."""
    from deepspeed.checkpoint.constants import (
        FP32_FLAT_GROUPS, PARAM_ALIGNMENT_PADDINGS, PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE,
    )
    from deepspeed.utils import zero_to_fp32 as z

    ds_dir = Path(ds_dir)
    try:
        model_files = list(map(Path, z.get_model_state_files(str(ds_dir))))
        optim = _zero_optimizer_states(ds_dir)
    except FileNotFoundError as e:
        raise CheckpointReadError(ds_dir, f"incomplete DeepSpeed checkpoint ({_first_line(e)})") from None
    model_states = [_zero_model_state(load_deepspeed_file(f), f) for f in model_files]
    try:
        stage, world_size = int(optim[0][ZERO_STAGE]), optim[0][PARTITION_COUNT]
        world_size = max(world_size) if isinstance(world_size, list) else int(world_size)
        if world_size != len(optim):
            raise CheckpointReadError(ds_dir, f"holds {len(optim)} optimiser-state files for {world_size} ranks")
        progress = io.StringIO()  # zero_to_fp32 reports progress on stdout and stderr
        with contextlib.redirect_stdout(progress), contextlib.redirect_stderr(progress):
            if stage <= 2:
                flats = [o[SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]
                state = z._get_fp32_state_dict_from_zero2_checkpoint(world_size, flats, model_states, False,
                                                                     optim[0].get(PARAM_ALIGNMENT_PADDINGS))
            else:
                flats = [o[FP32_FLAT_GROUPS] for o in optim]
                state = z._get_fp32_state_dict_from_zero3_checkpoint(world_size, flats, model_states, False)
            return z.to_torch_tensor(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise CheckpointReadError(ds_dir, f"damaged DeepSpeed checkpoint ({_first_line(e)})") from None
