from agdlm.data.loader import Data, build_data
from agdlm.data.packing import merge_states
from agdlm.data.sources import DataSourceError
from agdlm.data.tokenizer import EOT_TOKEN, encoding_for, gpt2_encoding

__all__ = ["Data", "build_data", "merge_states", "DataSourceError", "EOT_TOKEN", "encoding_for", "gpt2_encoding"]
