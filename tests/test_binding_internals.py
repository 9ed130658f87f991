"""The AGD bindings read private torch/DeepSpeed internals: when one is missing (an untested
version), the error is one line naming the attribute, the installed version and the tested
range, not an AttributeError deep in a step."""

import pytest

from agdlm.parallel.bindings import BindingInternalsMissing, DeepSpeedZero3Binding


def test_missing_deepspeed_internals_name_the_version():
    class NotAZero3Optimizer:  # a real object without ZeRO-3's flat partitions
        pass

    with pytest.raises(BindingInternalsMissing, match=r"fp32_partitioned_groups_flat.*deepspeed 0\.\d+.*tested: deepspeed"):
        DeepSpeedZero3Binding([], NotAZero3Optimizer())
