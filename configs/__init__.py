# The shipped run configs, installed as the package `agdlm.configs` so that
# `agdlm train` finds them from any working directory.
