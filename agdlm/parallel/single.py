"""One process, one device."""

from agdlm.parallel.base import Backend


class SingleBackend(Backend):
    name = "single"
